"""Metrics: console and a JSONL file always; wandb / tensorboard when `report_to` asks. Rank 0 only."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf" / "-inf": JSON has no such numbers, and null would hide them
    return value


class Tracker:
    """One object per run; every method is a no-op on ranks other than 0."""

    def __init__(self, cfg, is_main: bool, config_dict: dict, total_steps: int, resume: bool = False):
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step: Optional[int] = None
        self._wandb = None
        self._tensorboard = None
        self._metrics_file = None
        self._completions_file = None
        if not is_main:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(out / "metrics.jsonl", "a" if resume else "w")
        self._completions_path = out / "completions.jsonl"
        if "wandb" in cfg.report_to:
            import wandb

            from common.config import redact_argv
            sys.argv[:] = redact_argv(sys.argv)  # wandb stores the command line with the run
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=config_dict,
                                     dir=str(out), resume="allow" if resume else None)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        numbers = {"step": step, **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tensorboard is not None:
            for key, value in numbers.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(key, value, step)
        self._print_progress(row, step)

    def _print_progress(self, row: dict, step: int) -> None:
        # the clock starts at the first logged step: its own duration is unknown (set-up, compilation), so the
        # ETA shows "?" until the steps after it have been timed
        if self.start_step is None:
            self.start_step = step
            self.start_time = time.time()
        done = step - self.start_step
        eta = (time.time() - self.start_time) / done * (self.total_steps - step) if done > 0 else None
        shown = [f"step {step}/{self.total_steps}"]
        for key in ("loss", "reward", "kl", "eval/loss", "eval/reward", "eval/greedy_accuracy", "lr", "tokens_per_second"):
            if row.get(key) is not None:
                value = row[key]
                shown.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
        if row.get("step_skipped"):
            shown.append("optimizer step SKIPPED (non-finite)")
        if row.get("nonfinite_steps"):
            shown.append(f"nonfinite_steps {row['nonfinite_steps']}")
        shown.append("eta ?" if eta is None else f"eta {time.strftime('%H:%M:%S', time.gmtime(max(eta, 0)))}")
        print(" | ".join(shown), file=sys.stderr, flush=True)

    def log_completions(self, rows: list[dict], step: int) -> None:
        """Sampled prompt / completion / reward rows -> completions.jsonl (and a wandb table)."""
        if not self.is_main or not rows:
            return
        with open(self._completions_path, "a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")
        if self._wandb is not None:
            import wandb
            columns = sorted({k for row in rows for k in row})
            self._wandb.log({"completions": wandb.Table(columns=columns,
                                                        data=[[row.get(c) for c in columns] for row in rows])},
                            step=step)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.is_main or self._metrics_file.closed:
            return
        self._metrics_file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def setup_logging(debug: bool, is_main: bool = True) -> None:
    """INFO on rank 0, WARNING elsewhere; libraries' chatty INFO logs (accelerate's per-file saves) kept quiet."""
    import logging
    level = logging.DEBUG if debug else logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    if not debug:
        for name in ("accelerate", "deepspeed", "httpx", "LiteLLM", "litellm"):
            logging.getLogger(name).setLevel(logging.WARNING)
