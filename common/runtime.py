"""Accelerator, precision, optimizer and schedule: the set-up every script shares."""
from __future__ import annotations

import datetime
import logging
import math
import os
import sys

import torch

logger = logging.getLogger(__name__)


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def make_accelerator(cfg):
    """An Accelerator whose batch, clipping and precision settings come from the script config.

    bf16 / tf32 are used only where the hardware has them. Without CUDA the process group uses gloo, which also
    lets DeepSpeed ZeRO run on CPU.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_bf16 = cfg.bf16 and bf16_supported()
    if cfg.bf16 and not use_bf16:
        logger.info("bf16=true but this device has no bf16 support; training in float32")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.ddp_timeout),
                                               backend=None if torch.cuda.is_available() else "gloo"))
    if not torch.cuda.is_available():
        _skip_deepspeed_shm_build()
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )
    _refuse_unsynchronised_processes(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
        ds["train_batch_size"] = cfg.train_batch_size
        ds["gradient_clipping"] = cfg.max_grad_norm
        if ds.get("zero_optimization", {}).get("stage") == 3:
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # HF-format saves
    return accelerator


def _refuse_unsynchronised_processes(accelerator) -> None:
    """Accelerate enables FSDP only on GPUs: without CUDA an FSDP launch silently becomes DDP (ACCELERATE_USE_CPU)
    or independent, unsynchronised processes writing one output_dir. Stop with one clear line instead."""
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = accelerator.distributed_type
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if world > 1 and (kind == DistributedType.NO or (wants_fsdp and kind != DistributedType.FSDP)):
        got = "no distributed training" if kind == DistributedType.NO else f"{kind.value}, not FSDP"
        if os.environ.get("RANK", "0") != "0":   # one line, from rank 0: interleaved writes garble it
            sys.exit(2)
        print(f"error: {world} processes were launched{' with FSDP' if wants_fsdp else ''} but accelerate set up "
              f"{got} on this machine (device {accelerator.device.type}); accelerate's FSDP needs CUDA GPUs. On CPU use "
              f"accelerate_configs/cpu_2proc.yaml (DDP over gloo) or a DeepSpeed ZeRO config", file=sys.stderr,
              flush=True)
        sys.exit(2)


def _skip_deepspeed_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory comm op (~76 s) that gloo does not need."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    import importlib
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def total_optimizer_steps(cfg, examples_per_epoch: int) -> int:
    """max_steps > 0 wins; otherwise num_train_epochs over examples_per_epoch (global, per optimizer step)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps_per_epoch = max(1, examples_per_epoch // cfg.train_batch_size)
    return max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))


def make_optimizer(cfg, model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=torch.cuda.is_available())


def make_scheduler(cfg, optimizer, total_steps: int):
    """cosine / linear decay to 0, or constant, each after a linear warmup of warmup_ratio x total_steps."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def global_batches(num_examples: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """The epoch's index batches, identical on every rank (seeded by seed and epoch); a short tail is dropped."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist() if shuffle else list(range(num_examples))
    return [order[i: i + batch_size] for i in range(0, num_examples - batch_size + 1, batch_size)]


def shard(indices: list, rank: int, world: int) -> list:
    """This rank's contiguous slice of a global batch."""
    per_rank = len(indices) // world
    return indices[rank * per_rank: (rank + 1) * per_rank]
