"""The steps every script takes around its algorithm: start (accelerator, resume check), the prepared run
(optimizer, prepare, schedule, resume, tracker, preemption), one optimizer step, checkpoint-or-stop, finish.

A toolbox, not a Trainer: each script keeps its own loop and calls these where its step starts and ends.
`training_run` is a context manager, so the tracker and the engines close on every exit path, exceptions included.

Non-finite steps: when the step's loss or gradient norm is NaN or inf on any process, the optimizer step is
skipped on every process (gradients dropped, optimizer and schedule untouched) and counted; after
`max_consecutive_nonfinite` such steps in a row the run stops with `NonFiniteError` naming the step. Under
DeepSpeed the engine steps inside `backward`, so a non-finite step cannot be undone: the run stops at the first
one. A checkpoint is never written from non-finite weights (the last good checkpoints stay, and are not rotated).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

SKIPPED = "skipped"
# Tests only: optimizer steps whose loss is taken as NaN (comma-separated), to exercise the skip rule end to end.
FORCE_NONFINITE_ENV = "TEACHER_TRAINING_FORCE_NONFINITE_STEPS"


class NonFiniteError(RuntimeError):
    """Training produced NaN / inf where it must not go on."""


@dataclass
class NonFiniteCounter:
    """Skipped optimizer steps of this run: in total and in a row (the stop rule)."""
    limit: int = 3
    total: int = 0
    consecutive: int = 0

    def record(self, finite: bool, step: int, deepspeed: bool = False) -> None:
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if deepspeed:
            raise NonFiniteError(f"step {step}: non-finite loss or gradient norm; under DeepSpeed the engine has "
                                 f"already applied it, so the run stops here (no checkpoint is written from these "
                                 f"weights; resume from the last one with a lower learning_rate)")
        logger.warning("step %d: non-finite loss or gradient norm; optimizer step skipped (%d in a row, %d in this "
                       "run)", step, self.consecutive, self.total)
        if self.consecutive >= self.limit:
            raise NonFiniteError(f"step {step}: {self.consecutive} non-finite steps in a row "
                                 f"(max_consecutive_nonfinite={self.limit}); stopping without saving. The weights "
                                 f"are those of step {step - self.consecutive}; resume from the last checkpoint with "
                                 f"a lower learning_rate or max_grad_norm")


def all_finite(accelerator, *values) -> bool:
    """True when every value is finite on every process (one reduce, so all processes decide alike)."""
    local = all(v is None or bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all()) for v in values)
    flag = torch.tensor([0.0 if local else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float, loss, counter: NonFiniteCounter,
                   step: int) -> Union[float, str]:
    """clip -> non-finite check -> step -> schedule -> zero_grad; returns the gradient norm or SKIPPED.

    `loss` is this process's loss for the step (any scale: only its finiteness matters). max_grad_norm 0 means
    no clipping (the norm is still measured).
    """
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if str(step) in os.environ.get(FORCE_NONFINITE_ENV, "").split(","):
        loss = math.nan
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    finite = all_finite(accelerator, loss.detach() if torch.is_tensor(loss) else loss, grad_norm)
    counter.record(finite, step, deepspeed=deepspeed)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return SKIPPED
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm) if grad_norm is not None else math.nan


def step_metrics(grad_norm: Union[float, str], counter: NonFiniteCounter) -> dict:
    """The optimizer step's own metrics: grad_norm, and the skip counters once a step was skipped."""
    metrics = {"grad_norm": math.nan if grad_norm == SKIPPED else grad_norm}
    if grad_norm == SKIPPED or counter.total:
        metrics.update({"step_skipped": grad_norm == SKIPPED, "nonfinite_steps": counter.total})
    return metrics


def weights_finite(accelerator, *models) -> bool:
    """Every parameter of every model finite, on every process (ZeRO shards each check their own part)."""
    checks = [torch.isfinite(p.detach()).all() for m in models if m is not None for p in m.parameters()]
    local = bool(torch.stack(checks).all()) if checks else True  # one device sync, not one per parameter
    flag = torch.tensor([0.0 if local else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def checkpoint_or_stop(accelerator, preemption, model, tokenizer, cfg, step: int, state: Optional[dict] = None,
                       extra_models: Optional[dict] = None) -> bool:
    """At a step boundary: save when `save_steps` says so or a stop was requested; True means stop now."""
    from common.checkpoint import save_checkpoint

    stop = preemption.should_stop(accelerator)
    if (cfg.save_steps > 0 and step % cfg.save_steps == 0) or stop:
        ensure_finite_weights(accelerator, step, model, *(extra_models or {}).values())
        save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, step, checkpoint_state(cfg, state or {}),
                        cfg.save_total_limit, extra_models=extra_models)
    if stop:
        logger.warning("preemption signal received: saved checkpoint-%d and stopping", step)
    return stop


def ensure_finite_weights(accelerator, step: int, *models) -> None:
    """Refuse to write non-finite weights over good ones (a save would also rotate good checkpoints away)."""
    if not weights_finite(accelerator, *models):
        raise NonFiniteError(f"step {step}: the model's weights contain NaN or inf; not saving them (the last good "
                             f"checkpoint is kept); resume from it with a lower learning_rate or max_grad_norm")


@contextlib.contextmanager
def finite_sampling(accelerator, step: int, model):
    """Sampling from non-finite weights (or logits that overflow) stops the run with one clear error."""
    ensure_finite_weights(accelerator, step, model)
    try:
        yield
    except RuntimeError as err:
        if "inf" in str(err) and "nan" in str(err):  # torch.multinomial: "probability tensor contains inf, nan..."
            raise NonFiniteError(f"step {step}: sampling failed on non-finite probabilities ({err}); the policy's "
                                 f"logits overflow; resume from the last checkpoint with a lower learning_rate") \
                from err
        raise


@contextlib.contextmanager
def checkpoint_on_server_failure(accelerator, model, tokenizer, cfg, step: int, state: dict,
                                 extra_models: Optional[dict] = None):
    """A vLLM server or the engine's Ray actor down or dead inside the block (`ServerError`; `RayEngineError` is
    one), on any process: every process saves checkpoint-`step` (the weights the block started from) and the run
    stops with the error, the server's host and port or the actor named. Without a server or Ray backend the block
    runs as is."""
    from common.vllm_server import ServerError

    if not (getattr(cfg, "use_vllm_server", False) or getattr(cfg, "use_ray", False)
            or getattr(cfg, "student_engine", "hf") in ("server", "ray")):
        yield
        return
    failure = None
    try:
        yield
    except ServerError as err:
        failure = err
    failed = failure is not None
    if accelerator.num_processes > 1:   # every process must reach the save together
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="max").item() > 0
    if failed:
        from common.checkpoint import save_checkpoint
        if step > 0:
            save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, step, checkpoint_state(cfg, state),
                            cfg.save_total_limit, extra_models=extra_models)
        back = "the Ray cluster" if getattr(cfg, "use_ray", False) else "the server"
        where = f"saved checkpoint-{step}; resume with resume_from_checkpoint=true once {back} is back" \
            if step > 0 else "nothing trained yet, no checkpoint"
        raise ServerError(f"{failure or 'a vLLM server failed on another process'} ({where})") from failure


# ---------------------------------------------------------------------------------------------------------------------
# One run per output directory
# ---------------------------------------------------------------------------------------------------------------------
# A fresh run (no checkpoint to resume) refuses a directory that holds another run's checkpoints or metrics unless
# overwrite_output_dir=true; a resume refuses a checkpoint whose run differs in a key of the Config's
# RESUME_MUST_MATCH; rank 0 holds an exclusive lock on output_dir/.lock for the run's lifetime.

LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "completions.jsonl")


def _must_match(cfg) -> dict:
    from common.config import config_to_dict
    values = config_to_dict(cfg)  # secrets redacted: these values are written into every checkpoint
    keys = []
    for klass in reversed(type(cfg).__mro__):
        keys += [k for k in vars(klass).get("RESUME_MUST_MATCH", ()) if k not in keys]
    return {k: values.get(k) for k in keys}


def checkpoint_state(cfg, state: dict) -> dict:
    """trainer_state.json contents: the script's counters plus the keys a resume must match."""
    return {**state, "run_config": _must_match(cfg)}


def _lock_holder(root: Path) -> Optional[str]:
    """The pid holding the lock on root, or None when it is free (probes without creating anything)."""
    import fcntl
    path = root / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "?"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _previous_run(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    found = sorted(p.name for p in root.glob("checkpoint-*"))
    found += [name for name in RUN_FILES if (root / name).is_file() and (root / name).stat().st_size > 0]
    return found


def check_output_dir(cfg, resume_path: Optional[Path], is_main: bool) -> None:
    """Before anything is written: the directory is free, new or explicitly overwritten, or the resume matches."""
    from common.config import ConfigError
    root = Path(cfg.output_dir)
    if is_main and (holder := _lock_holder(root)) is not None:
        raise ConfigError(f"output_dir {root} is in use by another run (process {holder} holds {root / LOCK_FILE}); "
                          f"wait for it to finish or choose another output_dir")
    if resume_path is None:
        previous = _previous_run(root)
        if previous and not cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
            shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
            raise ConfigError(f"output_dir {root} already holds a run ({shown}); resume it with "
                              f"resume_from_checkpoint=latest, choose another output_dir, or set "
                              f"overwrite_output_dir=true to replace it")
        return
    state = json.loads((resume_path / "trainer_state.json").read_text())
    saved = state.get("run_config")
    if saved is not None:
        current = _must_match(cfg)
        differ = [k for k in current if k in saved and saved[k] != current[k]]
        if differ:
            shown = "; ".join(f"{k}: {saved[k]!r} there, {current[k]!r} now" for k in differ)
            raise ConfigError(f"resume_from_checkpoint: {resume_path} was trained with other settings ({shown}); "
                              f"resume with the same values, or start a new run in another output_dir")
    if cfg.max_steps > 0 and state["step"] >= cfg.max_steps:
        raise ConfigError(f"resume_from_checkpoint: {resume_path} is at step {state['step']}, and max_steps = "
                          f"{cfg.max_steps} leaves nothing to train; raise max_steps to train further")


class RunDirectory:
    """The claimed output_dir: locked (rank 0) until the process ends or `release()`."""

    def __init__(self, handle=None):
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def claim_output_dir(cfg, resume_path: Optional[Path], is_main: bool) -> RunDirectory:
    """After every check passed: lock, clear an overwritten run, drop metrics rows past the resumed step, save
    config.yaml. Rank 0 only writes; other ranks get an empty handle."""
    import fcntl

    from common.config import fail_fast, save_config
    if not is_main:
        return RunDirectory()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILE, "a+")
    with fail_fast():
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ValueError(f"output_dir {root} is in use by another run (it took {root / LOCK_FILE} first)") \
                from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    if resume_path is None and cfg.overwrite_output_dir:
        for old in root.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        for name in RUN_FILES:
            (root / name).unlink(missing_ok=True)
    if resume_path is not None:
        for name in RUN_FILES:  # rows the killed run wrote after its last checkpoint would be duplicated
            _keep_rows_up_to(root / name, resumed_step(resume_path))
    save_config(cfg, cfg.output_dir)
    return RunDirectory(handle)


def _keep_rows_up_to(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def resumed_step(resume_path: Optional[Path]) -> int:
    return json.loads((resume_path / "trainer_state.json").read_text())["step"] if resume_path else 0


# ---------------------------------------------------------------------------------------------------------------------
# Start, the prepared run, finish
# ---------------------------------------------------------------------------------------------------------------------

def start(cfg):
    """Logging (INFO on rank 0 only), the accelerator, the seed; then, before anything loads, the checkpoint to
    resume and the output_dir check. Returns (accelerator, resume_path or None)."""
    from accelerate.utils import set_seed

    from common.checkpoint import resolve_resume_path
    from common.config import fail_fast
    from common.runtime import make_accelerator
    from common.tracking import setup_logging

    setup_logging(cfg.activate_debugging_logs, is_main=os.environ.get("RANK", "0") == "0")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    with fail_fast():
        resume_path = resolve_resume_path(cfg.resume_from_checkpoint, cfg.output_dir)
        check_output_dir(cfg, resume_path, accelerator.is_main_process)
    return accelerator, resume_path


@dataclass
class TrainingRun:
    """The prepared model, optimizer and schedule, where the run resumed, its tracker, preemption flag and
    non-finite counter: what a script's loop calls between its own stages."""
    cfg: Any
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    tracker: Any
    preemption: Any
    nonfinite: NonFiniteCounter
    total_steps: int
    start_step: int = 0
    resume_path: Optional[Path] = None
    closing: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)   # closes in reverse order

    def close_at_exit(self, *things) -> None:
        """Engines, files: closed when the run ends, however it ends."""
        for thing in things:
            if thing is not None:
                self.closing.callback(thing.close)

    def sum_over_processes(self, value: float) -> torch.Tensor:
        return self.accelerator.reduce(torch.tensor(float(value), device=self.accelerator.device), "sum")

    def optimizer_step(self, loss, step: int) -> Union[float, str]:
        return optimizer_step(self.accelerator, self.model, self.optimizer, self.scheduler, self.cfg.max_grad_norm,
                              loss, self.nonfinite, step)

    def step_metrics(self, grad_norm: Union[float, str]) -> dict:
        """grad_norm (and skip counters), the learning rate."""
        return {**step_metrics(grad_norm, self.nonfinite), "lr": self.scheduler.get_last_lr()[0]}

    def should_log(self, step: int, grad_norm: Union[float, str]) -> bool:
        return step % self.cfg.logging_steps == 0 or step == self.total_steps or grad_norm == SKIPPED

    def checkpoint_or_stop(self, tokenizer, step: int, extra_models: Optional[dict] = None) -> bool:
        return checkpoint_or_stop(self.accelerator, self.preemption, self.model, tokenizer, self.cfg, step,
                                  extra_models=extra_models)

    def finish(self, tokenizer, step: int) -> None:
        """The final model (finite weights only) into output_dir, pushed to the Hub when asked."""
        from common.checkpoint import push_final_model, save_model
        ensure_finite_weights(self.accelerator, step, self.model)
        save_model(self.accelerator, self.model, tokenizer, Path(self.cfg.output_dir))
        if self.accelerator.is_main_process:
            logger.info("saved final model to %s", self.cfg.output_dir)
        if self.cfg.push_to_hub:
            push_final_model(self.accelerator, self.cfg.output_dir, self.cfg.hub_model_id)


@contextlib.contextmanager
def training_run(cfg, accelerator, model, total_steps: int, resume_path: Optional[Path], claimed: RunDirectory):
    """optimizer -> prepare -> schedule -> resume -> tracker, preemption flag; yields the TrainingRun and closes
    its tracker and everything passed to `close_at_exit` on every exit path; the output_dir lock goes last."""
    from common.checkpoint import PreemptionFlag, load_checkpoint
    from common.config import config_to_dict
    from common.runtime import make_optimizer, make_scheduler
    from common.tracking import Tracker

    optimizer = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # after prepare: DeepSpeed may regroup the parameters, and the schedule must drive the groups it steps
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    start_step = 0
    if resume_path is not None:
        start_step = load_checkpoint(accelerator, resume_path)["step"]
        logger.info("resumed from %s at step %d", resume_path, start_step)
    tracker = Tracker(cfg, accelerator.is_main_process, config_to_dict(cfg), total_steps, resume=start_step > 0)
    run = TrainingRun(cfg, accelerator, model, optimizer, scheduler, tracker,
                      PreemptionFlag(cfg.output_dir, accelerator.is_main_process),
                      NonFiniteCounter(cfg.max_consecutive_nonfinite), total_steps, start_step, resume_path)
    run.closing.callback(claimed.release)
    run.closing.enter_context(tracker)
    with run.closing:   # last in, first out: engines and files, then the tracker, then the lock
        yield run


def micro_batches(items: list, size: int) -> list[list]:
    """Consecutive slices of `size` items (the last may be shorter)."""
    return [items[start: start + size] for start in range(0, len(items), size)]


class MetricSums:
    """Scalar tensors summed by name over a step's micro-batches, then reduced over processes in one collective
    (every process must add the same names in the same order)."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: dict) -> None:
        for name, value in values.items():
            value = torch.as_tensor(value).detach().float().to(self.device)
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sums[name]

    def reduced(self, accelerator, reduction: str = "mean") -> dict[str, float]:
        totals = accelerator.reduce(torch.stack(list(self.sums.values())), reduction=reduction).tolist()
        return dict(zip(self.sums, totals))
