"""Peak CPU memory of the GKD loss (forward + backward): ours vs TRL's `generalized_jsd_loss`.

Each variant runs in a fresh subprocess. It allocates its inputs, runs the same function once on
tiny inputs (one-time allocations), records ru_maxrss as the baseline, then runs forward +
backward at full size; the number reported is ru_maxrss minus that baseline, i.e. the peak
memory the loss adds on top of its inputs (the gradient of the inputs included: every variant
has to produce it). Large tensors are mmap-backed and go back to the OS when freed, so RSS
follows live tensor memory.

Variants (inputs fp32; B x T tokens, part of each row masked as a prompt would be):
  trl        TRL GKDTrainer.generalized_jsd_loss on [B, T, V] logits          (baseline)
  plain      our generalized_jsd_loss on the same logits
  chunked    our chunked_generalized_jsd_loss on the same logits               (headline)

    .venv/bin/python bench/gkd_loss_memory.py [--batch 2 --seq 256 --vocab 150000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("trl", "plain", "chunked")


def _loss_fn(variant):
    if variant.startswith("trl"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        return GKDTrainer.generalized_jsd_loss
    sys.path.insert(0, str(REPO))
    import train_gkd

    return train_gkd.generalized_jsd_loss if variant == "plain" else train_gkd.chunked_generalized_jsd_loss


def _inputs(args, vocab, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (args.batch, args.seq)
    teacher = torch.randn(*shape, vocab, generator=generator) * 2  # [B, T, V]
    labels = torch.randint(0, vocab, shape, generator=generator)  # [B, T]
    labels[:, : args.prompt_len] = -100
    student = torch.randn(*shape, vocab, generator=generator) * 2  # [B, T, V]
    return student.requires_grad_(), teacher, labels


def child(args):
    import torch

    loss_fn = _loss_fn(args.variant)
    # one-time allocations (kernels, thread pools, autograd engine) on tiny inputs
    tiny = argparse.Namespace(batch=1, seq=4, prompt_len=1)
    tiny_inputs = _inputs(tiny, 32, 1)
    loss_fn(*tiny_inputs, args.beta, args.temperature).backward()
    del tiny_inputs

    student, teacher, labels = _inputs(args, args.vocab, args.seed)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = loss_fn(student, teacher, labels, args.beta, args.temperature)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"loss": loss.detach(), "student": student.grad}, args.out)
    print(json.dumps({"extra_peak_mib": (peak_kib - baseline_kib) / 1024, "seconds": seconds}))


def measure(args, variant, out_path):
    command = [
        sys.executable, __file__, "--child", variant, "--out", str(out_path),
        "--batch", str(args.batch), "--seq", str(args.seq), "--prompt-len", str(args.prompt_len),
        "--vocab", str(args.vocab),
        "--beta", str(args.beta), "--temperature", str(args.temperature), "--seed", str(args.seed),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_abs_diff(path_a, path_b):
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    return {key: (float((a[key].double() - b[key].double()).abs().max()), float(b[key].abs().max())) for key in a}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32, help="masked positions at the start of each row")
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="trl,plain,chunked",
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {VARIANTS}")
    tokens = args.batch * args.seq
    input_mib = tokens * args.vocab * 4 / 2**20
    print(f"B x T = {args.batch} x {args.seq} ({tokens - args.batch * args.prompt_len} unmasked), "
          f"V = {args.vocab}, beta = {args.beta}, temperature = {args.temperature}, "
          f"fp32; one [B, T, V] fp32 tensor = {input_mib:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for variant in variants:
            results[variant] = measure(args, variant, Path(tmp) / f"{variant}.pt")
            print(f"{variant:>15}: extra peak {results[variant]['extra_peak_mib']:8.0f} MiB"
                  f"   fwd+bwd {results[variant]['seconds']:6.2f} s")
        for ours, baseline in (("plain", "trl"), ("chunked", "trl")):
            if ours in results and baseline in results:
                ratio = results[ours]["extra_peak_mib"] / results[baseline]["extra_peak_mib"]
                diffs = max_abs_diff(Path(tmp) / f"{ours}.pt", Path(tmp) / f"{baseline}.pt")
                diff_text = ", ".join(f"{key} {diff:.1e} (of max {scale:.1e})" for key, (diff, scale) in diffs.items())
                print(f"{ours} / {baseline} peak memory ratio: {ratio:.3f}   max |ours - {baseline}|: {diff_text}")


if __name__ == "__main__":
    main()
