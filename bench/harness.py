"""Shared pieces of the benchmark scripts: machine summary, child-process environment, step CPU-time marks."""
from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine_summary() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers
    import trl
    load = os.getloadavg()
    return (f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, trl {trl.__version__}\n"
            f"load average at start (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def child_env(threads: int, tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLCONFIGDIR": str(tmp / "mpl"),
            "PYTHONDONTWRITEBYTECODE": "1"}


def record_step_cpu_times() -> list[float]:
    """Process CPU time at each of our per-step metric writes (Tracker.log with step_seconds), for CPU s/step.

    Instrumentation only: wraps the logging call, the training code is untouched.
    """
    from common import tracking

    marks: list[float] = []
    original_log = tracking.Tracker.log

    def log(self, metrics: dict, step: int) -> None:
        if "step_seconds" in metrics:
            marks.append(time.process_time())
        original_log(self, metrics, step)

    tracking.Tracker.log = log
    return marks


def step_cpu_seconds(marks: list[float]) -> list[float]:
    """CPU time between consecutive step ends; the first step has no start mark and is reported as NaN."""
    return [float("nan")] + [b - a for a, b in zip(marks, marks[1:])]


def run_order(repeats: int) -> list[tuple[int, str]]:
    """ours, TRL, TRL, ours, ...: alternating pairs, so a load change on the shared machine hits both alike."""
    pairs = [("ours", "trl") if r % 2 == 0 else ("trl", "ours") for r in range(repeats)]
    return [(r, kind) for r, pair in enumerate(pairs) for kind in pair]



def add_common_arguments(parser) -> None:
    """The options every ours-vs-TRL benchmark takes: steps, model shape, threads, repeats, seed, child plumbing."""
    import argparse
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="first optimizer steps of each run, not measured")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each child (same for both). 1 by default: on a shared 2-core machine, "
                             "2 OpenMP threads stall for seconds whenever one is descheduled")
    parser.add_argument("--repeats", type=int, default=1, help="runs per trainer, alternating ours/TRL order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)


def tiny_model(tmp: Path, args) -> Path:
    """The benchmark's Llama (scripts/make_tiny_model.py) at the requested shape, under tmp."""
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_model import save_tiny_model
    return save_tiny_model(tmp / "model", hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
                           seed=args.seed)


def run_child(script: str, kind: str, name: str, spec: dict, tmp: Path, threads: int) -> dict:
    """One measured run in a fresh process (`script --child kind --spec file`); returns its result file."""
    import json
    import subprocess
    import sys
    spec_file = tmp / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    started = time.time()
    completed = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", kind, "--spec", str(spec_file)],
                               cwd=ROOT, env=child_env(threads, tmp), capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n"
                           f"{completed.stderr[-6000:]}")
    print(f"  ran {name} in {time.time() - started:.0f} s (with start-up), load {os.getloadavg()[0]:.2f}", flush=True)
    return json.loads(Path(spec["result_file"]).read_text())


def parameter_count(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def print_end_load() -> None:
    end_load = os.getloadavg()
    print(f"load average at end (1/5/15 min): {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")


def run_benchmark(args, child_main, prefix: str, measure) -> None:
    """A child (`--child`): `child_main(kind, spec)`. The parent: machine summary, `measure(args, tmp)` in a
    temporary directory (kept with --keep), the load at the end."""
    import shutil
    import sys
    import tempfile
    if args.child:
        return child_main(args.child, args.spec)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("error: --warmup and --steps must be >= 1 (the first step has no CPU-time start mark)")
    sys.dont_write_bytecode = True  # write nothing outside the temporary directory
    print(machine_summary(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        measure(args, tmp)
        print_end_load()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
