"""Checkpoints: save (atomic), rotate, resume; preemption signals.

Layout of `output_dir/checkpoint-<step>/`:
  model files + tokenizer    Hugging Face format (`from_pretrained` works; a PEFT model saves its adapter)
  training_state/            accelerate state: optimizer, scheduler, RNG (and DeepSpeed shards)
  trainer_state.json         step, data position, and script-specific counters; written last
A checkpoint is written to `checkpoint-<step>.tmp` and renamed when complete, so a crash mid-save leaves
the previous checkpoint intact and no half-written directory under a final name; rotation renames an old
checkpoint to `checkpoint-<step>.deleting` before deleting it, so no half-deleted one does either.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[Path]:
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None  # nothing yet: a fresh start (preemptible jobs)
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint}: no {STATE_FILE} there; "
                                f"expected a directory written by this repo's checkpointing")
    return path


def save_checkpoint(accelerator, model, tokenizer, output_dir: str, step: int, state: dict,
                    save_total_limit: Optional[int] = None, extra_models: Optional[dict] = None) -> Path:
    """Save on all ranks (DeepSpeed needs every rank); rank 0 renames the finished directory into place."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_model(accelerator, model, tokenizer, tmp)
    for name, other in (extra_models or {}).items():
        save_model(accelerator, other, None, tmp / name)
    accelerator.save_state(str(tmp / "training_state"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        replaced = _set_aside(final) if final.exists() else None
        os.replace(tmp, final)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        _rotate(root, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def save_model(accelerator, model, tokenizer, directory: Path) -> None:
    """Hugging Face format; under ZeRO-3 the full state dict is gathered first (every rank must call)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def _set_aside(path: Path) -> Path:
    """Rename a checkpoint out of the `checkpoint-<step>` namespace before deleting it, so a kill mid-delete never
    leaves a half-deleted directory that looks like a checkpoint."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    return doomed


def _rotate(root: Path, save_total_limit: Optional[int]) -> None:
    for stale in [*root.glob("checkpoint-*.tmp"), *root.glob("checkpoint-*.deleting")]:
        shutil.rmtree(stale, ignore_errors=True)
    if save_total_limit is None or save_total_limit <= 0:
        return
    for old in list_checkpoints(root)[:-save_total_limit]:
        shutil.rmtree(_set_aside(old), ignore_errors=True)


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore optimizer, scheduler, RNG and model state; return trainer_state.json."""
    accelerator.load_state(str(path / "training_state"))
    return json.loads((path / STATE_FILE).read_text())


_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """When this process started (Linux /proc; elsewhere: when this module was imported)."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])  # field 22, starttime, in clock ticks since boot
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


class PreemptionFlag:
    """Stop cleanly at the next step boundary: save a checkpoint, then exit.

    Triggered by SIGTERM / SIGUSR1 reaching a training process, or by a file `<output_dir>/STOP` (launchers do not
    always forward signals to workers; slurm/train.sbatch touches the file when SLURM warns of the time limit).
    `should_stop()` agrees across ranks, so every process stops at the same step.
    """

    def __init__(self, output_dir: str, is_main: bool, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.stop_file = Path(output_dir) / "STOP"
        if is_main and self.stop_file.exists() and self.stop_file.stat().st_mtime < process_start_time():
            self.stop_file.unlink()  # left over from the run this one resumes; one written since is honoured
        for sig in signals:
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, accelerator) -> bool:
        local = self.requested or self.stop_file.exists()
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def push_final_model(accelerator, output_dir: str, repo_id: str) -> None:
    """Upload the final model directory to the Hugging Face Hub (rank 0; needs network and a token)."""
    if not accelerator.is_main_process:
        return
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=output_dir,
                      ignore_patterns=["checkpoint-*", "*.tmp", "wandb/*", "tensorboard/*", "STOP", ".lock"])
