"""Peak memory of GRPO's policy logprob forward + backward through a whole model, at vocabulary 150k.

The same random Llama (hidden 256, 2 layers, V=150k, tied embeddings) and the same batch of rollouts
(`--prompts` prompts x `--generations` completions of `--completion-tokens` tokens after `--prompt-tokens`),
one `common.logprobs.completion_logprobs` forward + backward per variant, each in a fresh subprocess:

  logits              the model returns [B, C+1, V] logits; chunked log-softmax over them (the usual way,
                      as TRL does it: logits_to_keep, then a selective log-softmax)
  lm_head             logprobs_from_hidden: lm_head returns the logprobs, logits one chunk at a time
  lm_head_shared      the same with share_prompt_prefix (each prompt once per micro-batch)

Peak = RSS high-water mark minus the RSS just before the forward (model and batch excluded).

    .venv/bin/python bench/grpo_logprob_memory.py
    .venv/bin/python bench/grpo_logprob_memory.py --dtype bfloat16 --completion-tokens 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("logits", "lm_head", "lm_head_shared")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, ROOT)
    from common.logprobs import cache_argument, completion_logprobs, plain_lm_head, rollout_batch
    from common.rollout import Rollout

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.prompt_tokens + args.completion_tokens + 8, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    model.train()
    generator = torch.Generator().manual_seed(1)
    rollouts = []
    for p in range(args.prompts):
        prompt = torch.randint(1, args.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
        for g in range(args.generations):
            completion = torch.randint(1, args.vocab_size, (args.completion_tokens,), generator=generator).tolist()
            rollouts.append(Rollout(prompt, completion, None, "length", p, g))
    share = variant == "lm_head_shared"
    batch = rollout_batch(rollouts, 0, False, share_prompts=share)
    head = plain_lm_head(model) if variant != "logits" else None
    cache_arg = cache_argument(model) if share else None

    before = current_rss_bytes()
    start = time.perf_counter()
    logps = completion_logprobs(model, batch, 1.0, cache_arg, head)   # [B, C]
    (logps * batch.completion_mask).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "peak_mib": (peak - before) / 2**20, "seconds": seconds,
            "logps_sum": float(logps.detach().sum()), "grad_norm": float(model.lm_head.weight.grad.float().norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=150_000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--variant", variant]
        for key in ("prompts", "generations", "prompt_tokens", "completion_tokens", "hidden_size", "vocab_size",
                    "dtype"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        output = subprocess.run(command, check=True, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])

    rows = args.prompts * args.generations
    print(f"{rows} completions ({args.prompts} prompts x {args.generations}), prompt {args.prompt_tokens} + completion "
          f"{args.completion_tokens} tokens, hidden {args.hidden_size}, V={args.vocab_size}, {args.dtype}; "
          f"peak = RSS high-water above pre-forward RSS")
    print(f"{'variant':16s} {'peak MiB':>10s} {'x logits':>9s} {'seconds':>8s} {'sum logps':>12s} {'|grad lm_head|':>15s}")
    base = results["logits"]["peak_mib"]
    for variant, r in results.items():
        print(f"{variant:16s} {r['peak_mib']:10.1f} {r['peak_mib'] / base:9.3f} {r['seconds']:8.2f} "
              f"{r['logps_sum']:12.3f} {r['grad_norm']:15.4f}")


if __name__ == "__main__":
    main()
