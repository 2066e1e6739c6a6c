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

