"""The steps every script takes around its algorithm: one optimizer step, checkpoint-or-stop.

A toolbox of functions, not a Trainer: each script keeps its own loop and calls these where its step ends.

Non-finite steps: when the step's loss or gradient norm is NaN or inf on any process, the optimizer step is
skipped on every process (gradients dropped, optimizer and schedule untouched) and counted; after
`max_consecutive_nonfinite` such steps in a row the run stops with `NonFiniteError` naming the step. Under
DeepSpeed the engine steps inside `backward`, so a non-finite step cannot be undone: the run stops at the first
one. A checkpoint is never written from non-finite weights (the last good checkpoints stay, and are not rotated).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

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
    local = all(bool(torch.isfinite(p.detach()).all()) for m in models if m is not None for p in m.parameters())
    flag = torch.tensor([0.0 if local else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def checkpoint_or_stop(accelerator, preemption, model, tokenizer, cfg, step: int, state: dict,
                       extra_models: Optional[dict] = None) -> bool:
    """At a step boundary: save when `save_steps` says so or a stop was requested; True means stop now."""
    from common.checkpoint import save_checkpoint

    stop = preemption.should_stop(accelerator)
    if (cfg.save_steps > 0 and step % cfg.save_steps == 0) or stop:
        ensure_finite_weights(accelerator, step, model, *(extra_models or {}).values())
        save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, step, state, cfg.save_total_limit,
                        extra_models=extra_models)
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
                                 f"logits overflow; resume from the last checkpoint with a lower learning_rate") from err
        raise
