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
from typing import Optional

import torch
import torch.nn.functional as F

from common.args import CommonArgs
from common.config import ConfigError, fail_fast, load_config
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

    # ----- setup -----------------------------------------------------------------------------------------------------
    from common.loop import claim_output_dir, micro_batches, start, training_run
    from common.models import check_model_source, load_causal_lm, load_tokenizer, log_parameter_count
    from common.runtime import bf16_supported, global_batches, shard, total_optimizer_steps

    accelerator, resume_path = start(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ----- data (before models: bad data fails fast) -----------------------------------------------------------------
    with fail_fast():
        train_examples, eval_examples = load_train_eval(cfg)
        check_model_source("model_name_or_path", cfg.model_name_or_path)
        tokenizer = load_tokenizer(cfg)
        train_rows, eval_rows = tokenize_rows(cfg, tokenizer, train_examples, eval_examples)
    total_steps = total_optimizer_steps(cfg, len(train_rows))
    steps_per_epoch = len(train_rows) // cfg.train_batch_size
    claimed = claim_output_dir(cfg, resume_path, accelerator.is_main_process)   # locked until the run ends
    logger.info("%d train rows, %d eval examples, %d optimizer steps (%d per epoch)", len(train_rows),
                len(eval_examples), total_steps, steps_per_epoch)

    # ----- model -----------------------------------------------------------------------------------------------------
    model = load_causal_lm(cfg, use_bf16=cfg.bf16 and bf16_supported())
    log_parameter_count("model", cfg.model_name_or_path, model)
    with training_run(cfg, accelerator, model, total_steps, resume_path, claimed) as run:
        model = run.model

        # ----- train -------------------------------------------------------------------------------------------------
        model.train()
        step = run.start_step
        for step in range(run.start_step + 1, total_steps + 1):
            step_start = time.time()
            epoch, batch_in_epoch = divmod(step - 1, steps_per_epoch)
            batch_indices = global_batches(len(train_rows), cfg.train_batch_size, cfg.seed, epoch, cfg.shuffle)
            local_rows = [train_rows[i] for i in shard(batch_indices[batch_in_epoch], rank, world)]
            batches = [collate_sft(rows, tokenizer.pad_token_id)
                       for rows in micro_batches(local_rows, cfg.per_device_train_batch_size)]
            # normalise by every loss token of the optimizer step, on all ranks and micro-batches
            global_tokens = run.sum_over_processes(sum(count_loss_tokens(b["labels"]) for b in batches))
            step_sums, input_tokens = torch.zeros(2, device=accelerator.device), 0   # nll, correct tokens
            for micro_batch in batches:
                micro_batch = {k: v.to(accelerator.device) for k, v in micro_batch.items()}
                input_tokens += int((micro_batch["input_ids"] != tokenizer.pad_token_id).sum())
                with accelerator.accumulate(model):
                    nll_sum, _, num_correct = sft_loss_sum(forward_logits(model, micro_batch), micro_batch["labels"])
                    # accelerate divides by the accumulation steps and DDP averages over ranks; undo both
                    accelerator.backward(nll_sum * cfg.gradient_accumulation_steps * world / global_tokens.clamp(min=1))
                step_sums += torch.stack([nll_sum.detach(), num_correct.to(step_sums.dtype)])
            grad_norm = run.optimizer_step(step_sums[0], step)

            # ----- log ---------------------------------------------------------------------------------------------
            if run.should_log(step, grad_norm):
                nll, correct = accelerator.reduce(step_sums, reduction="sum") / global_tokens.clamp(min=1)
                elapsed = time.time() - step_start
                run.tracker.log({"loss": nll.item(), "token_accuracy": correct.item(), **run.step_metrics(grad_norm),
                                 "epoch": epoch + batch_in_epoch / steps_per_epoch,
                                 "tokens_per_second": run.sum_over_processes(input_tokens).item() / max(elapsed, 1e-9),
                                 "step_seconds": elapsed}, step)
            if cfg.do_eval and eval_rows and (step % cfg.eval_steps == 0 or step == total_steps):
                run.tracker.log(evaluate(accelerator, model, eval_rows, cfg.per_device_eval_batch_size,
                                         tokenizer.pad_token_id), step)

            # ----- checkpoint --------------------------------------------------------------------------------------
            if run.checkpoint_or_stop(tokenizer, step):
                return

        # ----- final save and eval -----------------------------------------------------------------------------------
        run.finish(tokenizer, step)
        if cfg.eval_generation_reward and eval_examples:
            from common.evaluation import format_accuracy_table, generation_accuracy
            result = generation_accuracy(accelerator, cfg, model, tokenizer, eval_examples)
            run.tracker.log({"eval/greedy_accuracy": result["accuracy"]}, step)
            if accelerator.is_main_process:
                print(format_accuracy_table([(f"SFT {cfg.output_dir}", result)]), flush=True)
    accelerator.end_training()


def tokenize_rows(cfg, tokenizer, train_examples: list, eval_examples: list) -> tuple[list[dict], list[dict]]:
    """Training rows (packed with `packing`) and eval rows; warns about rows cut at max_seq_length."""
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
    return train_rows, eval_rows


def forward_logits(model, batch: dict) -> torch.Tensor:
    """[B, T, V] logits of a collate_sft batch (its labels stay out of the forward)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


def evaluate(accelerator, model, eval_rows: list[dict], batch_size: int, pad_token_id: int) -> dict:
    """Loss and token accuracy on the eval split (each process its shard, summed over processes)."""
    from common.loop import micro_batches
    from common.models import eval_mode
    totals = torch.zeros(3, device=accelerator.device)   # nll, tokens, correct
    with eval_mode(model), torch.no_grad():
        for rows in micro_batches(eval_rows[accelerator.process_index::accelerator.num_processes], batch_size):
            batch = {k: v.to(accelerator.device) for k, v in collate_sft(rows, pad_token_id).items()}
            totals += torch.stack([t.to(totals.dtype) for t in sft_loss_sum(forward_logits(model, batch), batch["labels"])])
    nll, tokens, correct = accelerator.reduce(totals, reduction="sum")
    return {"eval/loss": (nll / tokens.clamp(min=1)).item(), "eval/token_accuracy": (correct / tokens.clamp(min=1)).item()}


if __name__ == "__main__":
    main()
