"""Weight sync into an in-process vLLM engine under DeepSpeed ZeRO-3: capped groups vs one gather + one load per
parameter, in one run, fp32 on CPU, 2 processes (gloo).

    python bench/vllm_sync.py --processes 2   # relaunches itself under accelerate (ZeRO-3, gloo)

The model is a random Llama with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151936, tied head: 494M parameters; `--layers` / `--vocab` shrink it), built and saved locally.
Ours: `hf_weights` groups of at most `--group-mb` MiB, one coalesced gather per group, one `reload_weights` for the
whole model. Baseline (the per-parameter way TRL and ATLAS sync): for each parameter, one gather and one
`reload_weights` call with that tensor. Both end with the engine's greedy output checked against the trained model's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(path: Path, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_model import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def worker(model_dir: str, group_mb: float, out: str) -> None:
    import importlib
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None   # gloo needs no shm op
    import deepspeed
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from common.rollout import HFGenerateEngine, SamplingParams
    from common.vllm_engine import VLLMEngine

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
              train_batch_size=accelerator.num_processes)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = VLLMEngine(model_dir, tokenizer, accelerator, max_model_len=128, seed=0,
                        sync_group_bytes=int(group_mb * 2 ** 20))
    plain = accelerator.unwrap_model(model)

    aliases: dict = {}   # parameter -> every name it has (a tied embedding is also lm_head.weight)
    for name, param in plain.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)

    def per_parameter() -> int:
        calls = 0
        for param in plain.parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                tensor = param.data.clone()
            engine.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": iter([(alias, tensor) for alias in aliases[id(param)]]), "is_checkpoint_format": True})
            calls += 1
        engine.llm.reset_prefix_cache()
        return calls

    results = {}
    for variant in ("grouped", "per_parameter", "grouped"):   # grouped twice: the first pays one-off warm-up
        dist.barrier()
        start = time.perf_counter()
        if variant == "grouped":
            engine.sync_weights(model)
            detail = dict(engine.last_sync)
        else:
            detail = {"groups": per_parameter()}
        dist.barrier()
        results[variant] = {"seconds": time.perf_counter() - start, **detail}
    prompts = [tokenizer.encode("12+30=")]
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    results["greedy_equal"] = (engine.generate(prompts, greedy)[0].completion_ids ==
                               HFGenerateEngine(model, tokenizer, accelerator).generate(prompts, greedy)[0].completion_ids)
    results["parameters"] = sum(p.ds_numel for p in plain.parameters())
    results["tensors"] = sum(1 for _ in plain.parameters())
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(results))
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vllm_sync_bench")
    parser.add_argument("--group-mb", type=float, default=256)
    parser.add_argument("--processes", type=int, default=2, help="ZeRO-3 processes (each holds an engine)")
    parser.add_argument("--layers", type=int, default=24, help="fewer layers (Qwen2.5-0.5B: 24) fit smaller machines")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir) / f"l{args.layers}_v{args.vocab}"
    model_dir, out = workdir / "model", workdir / "result.json"
    if args.worker:
        worker(str(model_dir), args.group_mb, str(out))
        return
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, args.layers, args.vocab)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
                    "--num_processes", str(args.processes), "--num_machines", "1", "--mixed_precision", "no", __file__, "--worker",
                    "--workdir", args.workdir, "--layers", str(args.layers), "--vocab", str(args.vocab),
                    "--group-mb", str(args.group_mb)], env=env, check=True)
    r = json.loads(out.read_text())
    grouped, baseline = r["grouped"], r["per_parameter"]
    print(f"{r['parameters'] / 1e6:.0f}M parameters in {r['tensors']} tensors, fp32, ZeRO-3 on {args.processes} CPU "
          f"process(es)")
    print(f"capped groups ({args.group_mb:g} MiB): {grouped['groups']} gathers + 1 reload, {grouped['seconds']:.2f} s")
    print(f"per parameter: {baseline['groups']} gathers + {baseline['groups']} reloads, {baseline['seconds']:.2f} s")
    print(f"ratio per-parameter / grouped: {baseline['seconds'] / grouped['seconds']:.2f}x; greedy output equal to "
          f"the trainer's after the syncs: {r['greedy_equal']}")


if __name__ == "__main__":
    main()
