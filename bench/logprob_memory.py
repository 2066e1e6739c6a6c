"""Peak memory of per-token logprobs, forward + backward: naive vs chunked (common/ops.py).

All variants start from the same final hidden states [1, N, H] and lm_head weight [V, H] (both
requiring grad) and compute sum(advantage * logprob(token)) then backward:

  naive           logits = hidden @ W.T; log_softmax(logits.float()).gather(...)   (the baseline)
  chunked_logits  logits = hidden @ W.T; selective_log_softmax(logits, ...)
  chunked_hidden  selective_log_softmax_from_hidden(hidden, W, ...)  (logits never whole)

Each variant runs in a fresh subprocess; its peak is the RSS high-water mark (getrusage) minus
the RSS just before the forward pass, so inputs, torch and the interpreter are not counted.

    .venv/bin/python bench/logprob_memory.py                   # N=1024, H=256, V=150000, fp32
    .venv/bin/python bench/logprob_memory.py --dtype bfloat16 --tokens 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked_logits", "chunked_hidden")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, tokens: int, hidden_size: int, vocab_size: int, dtype_name: str, chunk_size) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from common.ops import selective_log_softmax, selective_log_softmax_from_hidden

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = (torch.randn(1, tokens, hidden_size) / hidden_size**0.5).to(dtype).requires_grad_()  # [1, N, H]
    weight = torch.randn(vocab_size, hidden_size).to(dtype).requires_grad_()  # [V, H]
    index = torch.randint(0, vocab_size, (1, tokens))  # [1, N]
    advantages = torch.randn(1, tokens)  # [1, N]

    before = current_rss_bytes()
    start = time.perf_counter()
    if variant == "naive":
        logits = hidden @ weight.T  # [1, N, V]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    elif variant == "chunked_logits":
        logits = hidden @ weight.T  # [1, N, V]
        logps = selective_log_softmax(logits, index, chunk_size=chunk_size)
    else:
        logps = selective_log_softmax_from_hidden(hidden, weight, index, chunk_size=chunk_size)
    (advantages * logps).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "variant": variant,
        "peak_mib": (peak - before) / 2**20,
        "seconds": seconds,
        "grad_norm": float(weight.grad.float().norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="B*T tokens")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=150_000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: ops.CHUNK_BYTES)")
    parser.add_argument("--variant", choices=VARIANTS, help="internal: run one variant and print JSON")
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden_size, args.vocab_size, args.dtype, args.chunk_size)))
        return

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--tokens", str(args.tokens),
                   "--hidden-size", str(args.hidden_size), "--vocab-size", str(args.vocab_size), "--dtype", args.dtype]
        if args.chunk_size is not None:
            command += ["--chunk-size", str(args.chunk_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])

    naive = results["naive"]
    print(f"tokens={args.tokens} hidden={args.hidden_size} vocab={args.vocab_size} dtype={args.dtype} "
          f"chunk_size={args.chunk_size or 'auto'}; peak = RSS high-water above pre-forward RSS")
    print(f"{'variant':16s} {'peak MiB':>10s} {'x naive':>8s} {'seconds':>8s} {'|grad W|':>10s}")
    for variant, result in results.items():
        print(f"{variant:16s} {result['peak_mib']:10.1f} {result['peak_mib'] / naive['peak_mib']:8.3f} "
              f"{result['seconds']:8.2f} {result['grad_norm']:10.4f}")
    ratio = results["chunked_hidden"]["peak_mib"] / naive["peak_mib"]
    print(f"chunked_hidden / naive peak memory ratio: {ratio:.3f} (goal <= 0.15)")


if __name__ == "__main__":
    main()
