"""Supervised fine-tuning: next-token NLL on the assistant completion, optional packing.

Algorithm: each example is a chat prompt plus an assistant completion, rendered with the tokenizer's chat
template. The loss is the mean negative log-likelihood over completion tokens (all tokens when
completion_only_training=false), averaged over every completion token of the optimizer step, across
gradient-accumulation micro-batches and processes, so accumulation and device count do not change it.
With packing=true, examples are packed first-fit into rows of max_seq_length tokens; position ids restart per
document and attention never crosses documents.

Launch:
    accelerate launch --config_file accelerate_configs/zero3.yaml train_sft.py \
        --config configs/recipe/teacher_sft.yaml key=value ...
    python train_sft.py --config configs/recipe/quickstart_sft.yaml        # CPU quickstart
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from common.args import CommonArgs
from common.config import ConfigError, config_to_dict, fail_fast, load_config
from common.tracking import setup_logging
from common.data import (IGNORE_INDEX, check_row_lengths, collate_sft, load_train_eval, pack_examples,
                         tokenize_example)

logger = logging.getLogger("train_sft")


@dataclass
class Config(CommonArgs):
    # trainer/base_sft.yaml (spec defaults)
    max_steps: int = -1
    num_train_epochs: float = 1
    train_batch_size: Optional[int] = 64
    per_device_train_batch_size: Optional[int] = 4
    learning_rate: float = 2e-4
    max_seq_length: int = 4096
    packing: bool = True
    trainer_log_name: str = "sft"
    # held-out greedy generation scored by a reward function (e.g. arithmetic) after training; null = off
    eval_generation_reward: Optional[str] = None
    eval_generation_samples: int = 256
    eval_max_new_tokens: int = 64

    RANGES = {"max_seq_length": "[2, inf)", "eval_generation_samples": "[1, inf)", "eval_max_new_tokens": "[1, inf)"}
    RESUME_MUST_MATCH = ("max_seq_length", "packing")

    def validate(self) -> None:
        super().validate()
        if self.eval_generation_reward:
            from common.rewards import REWARD_REGISTRY
            if self.eval_generation_reward not in REWARD_REGISTRY:
                raise ConfigError(f"key 'eval_generation_reward' = {self.eval_generation_reward!r}: not a registered "
                                  f"reward; available: {', '.join(sorted(REWARD_REGISTRY))}")


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------

def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL of the labelled tokens; position t predicts labels[:, t + 1].

    logits: [B, T, V], labels: [B, T] with IGNORE_INDEX where no loss is taken.
    Returns (nll_sum, num_tokens, num_correct) so the caller can normalise over the whole optimizer step.
    """
    shifted_labels = labels[:, 1:]                                  # [B, T-1]
    selected = shifted_labels != IGNORE_INDEX                       # [B, T-1]
    picked_logits = logits[:, :-1][selected].float()                # [N, V] only labelled positions, in fp32
    targets = shifted_labels[selected]                              # [N]
    nll_sum = F.cross_entropy(picked_logits, targets, reduction="sum")
    num_correct = (picked_logits.argmax(-1) == targets).sum()
    return nll_sum, selected.sum(), num_correct


def count_loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    with fail_fast():
        cfg = load_config(Config, argv, description=__doc__)
    setup_logging(cfg.activate_debugging_logs)

    # ----- setup -----------------------------------------------------------------------------------------------------
    from accelerate.utils import set_seed

    from common.checkpoint import PreemptionFlag, load_checkpoint, push_final_model, resolve_resume_path, save_model
    from common.loop import (SKIPPED, NonFiniteCounter, check_output_dir, checkpoint_or_stop, claim_output_dir,
                             ensure_finite_weights, optimizer_step, resumed_step, step_metrics)
    from common.models import check_model_source, count_parameters, load_causal_lm, load_tokenizer
    from common.runtime import (bf16_supported, global_batches, make_accelerator, make_optimizer, make_scheduler,
                                shard, total_optimizer_steps)
    from common.tracking import Tracker

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ----- data (before models: bad data fails fast) -----------------------------------------------------------------
    with fail_fast():
        resume_path = resolve_resume_path(cfg.resume_from_checkpoint, cfg.output_dir)
        check_output_dir(cfg, resume_path, accelerator.is_main_process)
        train_examples, eval_examples = load_train_eval(cfg)
        check_model_source("model_name_or_path", cfg.model_name_or_path)
        tokenizer = load_tokenizer(cfg)
        tokenize = lambda e: tokenize_example(e, tokenizer, cfg.max_seq_length, cfg.completion_only_training)
        train_rows = [tokenize(e) for e in train_examples]
        eval_rows = [tokenize(e) for e in eval_examples] if cfg.do_eval else []
        num_cut, num_without_target = check_row_lengths(train_rows, cfg.max_seq_length)
        if cfg.packing:
            train_rows = pack_examples(train_rows, cfg.max_seq_length)
        if len(train_rows) < cfg.train_batch_size:
            raise ValueError(f"{len(train_rows)} training rows (after packing={cfg.packing}) is fewer than "
                             f"train_batch_size={cfg.train_batch_size}")
    if num_cut:
        logger.warning("%d of %d training rows reach max_seq_length=%d and are cut there (%d of them keep no "
                       "completion token and add nothing to the loss)", num_cut, len(train_examples),
                       cfg.max_seq_length, num_without_target)
    total_steps = total_optimizer_steps(cfg, len(train_rows))
    steps_per_epoch = len(train_rows) // cfg.train_batch_size
    # locked, config.yaml written, stale metrics rows dropped; the lock is held until the process exits
    run_dir = claim_output_dir(cfg, resume_path, resumed_step(resume_path), accelerator.is_main_process)
    logger.info("%d train rows, %d eval examples, %d optimizer steps (%d per epoch)", len(train_rows),
                len(eval_examples), total_steps, steps_per_epoch)

    # ----- models ----------------------------------------------------------------------------------------------------
    model = load_causal_lm(cfg, use_bf16=cfg.bf16 and bf16_supported())
    total_params, trainable_params = count_parameters(model)
    logger.info("model %s: %.2fM parameters, %.2fM trainable", cfg.model_name_or_path, total_params / 1e6,
                trainable_params / 1e6)
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
    preemption = PreemptionFlag(cfg.output_dir, accelerator.is_main_process)
    accum = cfg.gradient_accumulation_steps
    nonfinite = NonFiniteCounter(cfg.max_consecutive_nonfinite)

    def evaluate() -> dict:
        model.eval()
        nll, tokens, correct = torch.zeros(3, device=accelerator.device)
        local = eval_rows[rank::world]
        with torch.no_grad():
            for start in range(0, len(local), cfg.per_device_eval_batch_size):
                batch = collate_sft(local[start: start + cfg.per_device_eval_batch_size], tokenizer.pad_token_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
                s, n, c = sft_loss_sum(logits, batch["labels"])
                nll, tokens, correct = nll + s, tokens + n, correct + c
        totals = accelerator.reduce(torch.stack([nll, tokens, correct]), reduction="sum")
        model.train()
        return {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item(),
                "eval/token_accuracy": (totals[2] / totals[1].clamp(min=1)).item()}

    # ----- train -----------------------------------------------------------------------------------------------------
    model.train()
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        step_start = time.time()
        epoch, batch_in_epoch = divmod(step - 1, steps_per_epoch)
        batch_indices = global_batches(len(train_rows), cfg.train_batch_size, cfg.seed, epoch, cfg.shuffle)
        local_indices = shard(batch_indices[batch_in_epoch], rank, world)
        micro_batches = [collate_sft([train_rows[i] for i in local_indices[j: j + cfg.per_device_train_batch_size]],
                                     tokenizer.pad_token_id)
                         for j in range(0, len(local_indices), cfg.per_device_train_batch_size)]
        # normalise by every loss token of the optimizer step, on all ranks and micro-batches
        local_tokens = sum(count_loss_tokens(mb["labels"]) for mb in micro_batches)
        global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum")
        step_nll = torch.zeros((), device=accelerator.device)
        step_correct = torch.zeros((), device=accelerator.device)
        input_tokens = 0
        for micro_batch in micro_batches:
            micro_batch = {k: v.to(accelerator.device) for k, v in micro_batch.items()}
            input_tokens += int((micro_batch["input_ids"] != tokenizer.pad_token_id).sum())
            with accelerator.accumulate(model):
                logits = model(**{k: v for k, v in micro_batch.items() if k != "labels"}, use_cache=False).logits
                nll_sum, _, num_correct = sft_loss_sum(logits, micro_batch["labels"])
                # accelerate divides by the accumulation steps and DDP averages over ranks; undo both
                loss = nll_sum * accum * world / global_tokens.clamp(min=1)
                accelerator.backward(loss)
            step_nll += nll_sum.detach()
            step_correct += num_correct
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step_nll, nonfinite,
                                   step)

        # ----- log -------------------------------------------------------------------------------------------------
        if step % cfg.logging_steps == 0 or step == total_steps or grad_norm == SKIPPED:
            totals = accelerator.reduce(torch.stack([step_nll, step_correct]), reduction="sum")
            global_input = accelerator.reduce(torch.tensor(float(input_tokens), device=accelerator.device), "sum")
            elapsed = time.time() - step_start
            tracker.log({"loss": (totals[0] / global_tokens.clamp(min=1)).item(),
                         "token_accuracy": (totals[1] / global_tokens.clamp(min=1)).item(),
                         **step_metrics(grad_norm, nonfinite),
                         "lr": scheduler.get_last_lr()[0], "epoch": epoch + batch_in_epoch / steps_per_epoch,
                         "tokens_per_second": global_input.item() / max(elapsed, 1e-9),
                         "step_seconds": elapsed}, step)
        if cfg.do_eval and eval_rows and (step % cfg.eval_steps == 0 or step == total_steps):
            tracker.log(evaluate(), step)

        # ----- checkpoint ------------------------------------------------------------------------------------------
        if checkpoint_or_stop(accelerator, preemption, model, tokenizer, cfg, step,
                              {"epoch": epoch, "batch_in_epoch": batch_in_epoch + 1}):
            tracker.close()
            return

    # ----- final save and eval ---------------------------------------------------------------------------------------
    ensure_finite_weights(accelerator, step, model)
    save_model(accelerator, model, tokenizer, Path(cfg.output_dir))
    if accelerator.is_main_process:
        logger.info("saved final model to %s", cfg.output_dir)
    if cfg.push_to_hub:
        push_final_model(accelerator, cfg.output_dir, cfg.hub_model_id)
    if cfg.eval_generation_reward and eval_examples:
        from common.evaluation import format_accuracy_table, greedy_eval
        from common.rewards import get_reward_factory
        reward_fn = get_reward_factory(cfg.eval_generation_reward)(cfg)
        result = greedy_eval(accelerator, model, tokenizer, eval_examples, reward_fn, cfg.eval_max_new_tokens,
                             cfg.eval_generation_samples)
        tracker.log({"eval/greedy_accuracy": result["accuracy"]}, step)
        if accelerator.is_main_process:
            print(format_accuracy_table([(f"SFT {cfg.output_dir}", result)]), flush=True)
    tracker.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
