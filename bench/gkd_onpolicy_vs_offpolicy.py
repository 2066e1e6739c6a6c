"""On-policy vs supervised distillation: the same teacher, student init, data and steps, lmbda=1 vs lmbda=0.

lmbda=1: every step the student samples the completions (on-policy GKD); lmbda=0: the dataset's
completions (supervised KD). Both runs use train_gkd.py with configs/recipe/quickstart_gkd.yaml
(2-digit addition), differ only in `lmbda`, and report the student's held-out greedy accuracy
before and after, the eval divergence, and wall time. The table is printed whatever it shows.
Runs go in parallel subprocesses, one thread each.

Prerequisites (the quickstart teacher and student):
    python scripts/make_tiny_model.py && python train_sft.py --config configs/recipe/quickstart_sft.yaml
    python scripts/make_tiny_model.py --output tiny_models/llama-tiny-student --hidden-size 64 --layers 2
Run:
    .venv/bin/python bench/gkd_onpolicy_vs_offpolicy.py [--steps 600 --seeds 1,2 --beta 0.0] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "configs/recipe/quickstart_gkd.yaml"
LABELS = {0.0: "supervised KD (dataset completions)", 1.0: "on-policy (student samples)"}


def run_one(lmbda: float, seed: int, args, output_root: Path) -> dict:
    out = output_root / f"lmbda{lmbda:g}_seed{seed}"
    command = [sys.executable, "train_gkd.py", "--config", RECIPE, f"model_name_or_path={args.student}",
               f"teacher_model_name_or_path={args.teacher}", f"output_dir={out}", f"lmbda={lmbda}",
               f"seed={seed}", f"max_steps={args.steps}", f"beta={args.beta}", "seq_kd=false",
               f"eval_steps={args.steps}", f"logging_steps={max(1, args.steps // 10)}", "save_steps=0",
               f"eval_generation_samples={args.eval_samples}", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if result.returncode != 0:
        raise RuntimeError(f"lmbda={lmbda} seed={seed} failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r for r in rows if "eval/greedy_accuracy" in r]
    return {"lmbda": lmbda, "seed": seed, "teacher": accuracy[0]["eval/teacher_greedy_accuracy"],
            "before": accuracy[0]["eval/greedy_accuracy"], "after": accuracy[-1]["eval/greedy_accuracy"],
            "eval_loss": [r["eval/loss"] for r in rows if "eval/loss" in r][-1],
            "on_policy_share": sum(r["on_policy"] for r in rows if "on_policy" in r)
            / max(1, sum(1 for r in rows if "on_policy" in r)),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="outputs/quickstart_sft")
    parser.add_argument("--student", default="tiny_models/llama-tiny-student")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="1", help="comma-separated; each seed also changes the data split")
    parser.add_argument("--beta", type=float, default=0.0, help="0 = forward KL (the quickstart's), 0.5 = JSD")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs")
    args = parser.parse_args()
    for name in ("teacher", "student"):
        if not (REPO / getattr(args, name)).is_dir() and not Path(getattr(args, name)).is_dir():
            sys.exit(f"--{name} {getattr(args, name)}: not found; see the prerequisites in this script's docstring")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="gkd_bench_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(run_one, lmbda, seed, args, Path(tmp)) for seed in seeds for lmbda in (0.0, 1.0)]
        results = [job.result() for job in jobs]

    print(f"\nGKD on-policy vs supervised KD: teacher {args.teacher}, student {args.student}, {args.steps} steps, "
          f"beta={args.beta}, temperature from {RECIPE}, held-out 2-digit addition ({args.eval_samples} prompts)")
    print("| lmbda | sequences | seed | teacher acc | student acc before | student acc after | eval divergence | "
          "wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['lmbda']:g} | {LABELS[r['lmbda']]} | {r['seed']} | {100 * r['teacher']:.1f} % | "
              f"{100 * r['before']:.1f} % | {100 * r['after']:.1f} % | {r['eval_loss']:.4f} | {r['seconds']:.0f} |")
    for seed in seeds:
        on = next(r for r in results if r["seed"] == seed and r["lmbda"] == 1.0)
        off = next(r for r in results if r["seed"] == seed and r["lmbda"] == 0.0)
        print(f"seed {seed}: on-policy minus supervised KD = {100 * (on['after'] - off['after']):+.1f} accuracy "
              f"points; wall time ratio on/off = {on['seconds'] / off['seconds']:.2f}")


if __name__ == "__main__":
    main()
