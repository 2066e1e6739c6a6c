"""GKD: generalized knowledge distillation (Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649).

A frozen teacher is distilled into a student on a mix of sequences. Once per optimizer step (the
same draw on every process and every accumulation micro-step, from `random.Random(seed + step)`):
with probability `lmbda` the student samples the completions of the step's prompts (on-policy);
otherwise the teacher samples them (`seq_kd: true`) or the dataset's completions are used. Teacher
and student then score the very same [prompt | completion] tokens, and on every completion token
the student is pushed towards the teacher with the generalized Jensen-Shannon divergence

    M    = (1 - beta) * S + beta * T                    (mixture in probability space)
    JSD  = beta * KL(T || M) + (1 - beta) * KL(S || M)
    beta = 0 -> forward KL(T || S),  beta = 1 -> reverse KL(S || T)

with S and T the student's and teacher's next-token distributions at `temperature` (the same
temperature the completions are sampled at). This is the parametrisation TRL's `GKDTrainer` uses.
As beta -> 0 or 1 the mixture formula itself goes to 0, so the two ends are defined as the plain
KLs (a jump at the ends, as in TRL). The loss is summed over completion tokens and divided by the
completion tokens of the whole optimizer step (all processes, all micro-batches), so accumulation
and process count do not change it. Logits are projected only at the positions that predict a
completion token, and the divergence runs in chunks of tokens, so neither model ever holds
[B, T, V] logits.

Launch:
    accelerate launch --config_file accelerate_configs/zero3.yaml train_gkd.py \
        --config configs/recipe/teacher_gkd.yaml key=value ...
    python train_gkd.py --config configs/recipe/quickstart_gkd.yaml        # CPU quickstart

The loss functions at the top are pure tensor functions; `main()` (the training loop) follows.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from common.args import CommonArgs
from common.config import ConfigError, fail_fast, load_config
from common.data import check_row_lengths, collate_sft, encode_prompt, load_train_eval, tokenize_example
from common.logprobs import lm_head_at
from common.ops import (JSD_REDUCTIONS, check_jsd_arguments, chunked_generalized_jsd_loss, is_real_number,
                        jsd_token_mask, reduce_per_token)

logger = logging.getLogger("train_gkd")

IGNORE_INDEX = -100
REDUCTIONS = JSD_REDUCTIONS   # see the table below
SEQUENCE_SOURCES = ("student", "teacher", "dataset")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass
class Config(CommonArgs):
    # trainer/gkd.yaml
    teacher_model_name_or_path: Optional[str] = None   # required; must share the student's tokenizer
    temperature: float = 0.9                           # sampling temperature, and the loss's
    lmbda: float = 0.5                                 # share of optimizer steps whose completions the student samples
    beta: float = 0.5                                  # 0: forward KL(T||S), 1: reverse KL(S||T), between: JSD
    seq_kd: bool = False                               # off-policy steps: the teacher samples, not the dataset
    max_new_tokens: int = 128                          # per sampled completion
    max_seq_length: int = 4096                         # prompt + completion; sampled prompts are cut (left) to leave
                                                       # room for max_new_tokens
    generation_batch_size: Optional[int] = None        # prompts per generate() call; null = the process's whole step
    disable_dropout: bool = True                       # student and teacher: dropout would make the targets noisy
    train_batch_size: Optional[int] = 64
    per_device_train_batch_size: Optional[int] = 4
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.05
    trainer_log_name: str = "gkd"
    # held-out greedy generation scored by a reward function (e.g. arithmetic), teacher and student; null = off
    eval_generation_reward: Optional[str] = None
    eval_generation_samples: int = 256
    eval_max_new_tokens: int = 64
    # sampling through vLLM in the training processes (common/vllm_engine.py): the student's engine is synced after
    # every optimizer step, the teacher's (seq_kd) is frozen
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = 0.3         # per engine (student and teacher each have one)
    vllm_dtype: str = "auto"
    vllm_max_model_len: Optional[int] = None
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False
    vllm_sync_group_mb: float = 256
    enable_prefix_caching: bool = False
    enforce_eager: bool = True

    RANGES = {
        "temperature": "(0, inf)", "max_new_tokens": "[1, inf)",  # lmbda, beta: check_gkd_hyperparameters
        "max_seq_length": "[2, inf)", "generation_batch_size": "[1, inf)", "eval_generation_samples": "[1, inf)",
        "eval_max_new_tokens": "[1, inf)", "vllm_gpu_memory_utilization": "(0, 1]", "vllm_max_model_len": "[1, inf)",
        "vllm_tensor_parallel_size": "[1, inf)", "vllm_sync_group_mb": "(0, inf)",
    }
    RESUME_MUST_MATCH = ("teacher_model_name_or_path", "lmbda", "beta", "temperature", "seq_kd", "max_new_tokens",
                         "max_seq_length")

    def validate(self) -> None:
        super().validate()
        if not self.teacher_model_name_or_path:
            raise ConfigError("key 'teacher_model_name_or_path' is required (the frozen teacher to distil from)")
        try:
            check_gkd_hyperparameters(self.beta, self.lmbda, self.temperature)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.max_new_tokens < 1:
            raise ConfigError(f"key 'max_new_tokens' = {self.max_new_tokens}: expected >= 1")
        if self.max_seq_length <= self.max_new_tokens:
            raise ConfigError(f"key 'max_seq_length' = {self.max_seq_length} must exceed max_new_tokens = "
                              f"{self.max_new_tokens}: sampled prompts need room")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ConfigError(f"key 'generation_batch_size' = {self.generation_batch_size}: expected null or >= 1")
        if not self.completion_only_training:
            raise ConfigError("key 'completion_only_training' = false: GKD distils on completion tokens only; "
                              "set it to true")
        if self.use_vllm:
            from common.config import world_size_from_env
            from common.vllm_engine import check_vllm_config
            check_vllm_config(self, world_size_from_env())
        if self.eval_generation_reward:
            from common.rewards import REWARD_REGISTRY
            if self.eval_generation_reward not in REWARD_REGISTRY:
                raise ConfigError(f"key 'eval_generation_reward' = {self.eval_generation_reward!r}: not a registered "
                                  f"reward; available: {', '.join(sorted(REWARD_REGISTRY))}")


# ---------------------------------------------------------------------------------------------
# Loss: generalized JSD
# ---------------------------------------------------------------------------------------------
# Reductions (N = number of unmasked tokens, V = vocabulary size):
#   "batchmean": sum over vocabulary, mean over the N unmasked tokens        -> scalar
#   "sum":       sum over vocabulary and unmasked tokens                     -> scalar
#   "mean":      mean over the N * V (token, vocabulary) elements            -> scalar (batchmean / V)
#   "none":      per-token divergence summed over vocabulary, 0 where masked -> [B, T]
# With no unmasked token every scalar reduction is 0 (never NaN) and gradients are 0.
#
# Where TRL's `GKDTrainer.generalized_jsd_loss` (trl 1.16) differs; the values agree for
# "batchmean" and "sum" whenever `labels` is given:
#   - dtype: TRL computes in the logits' dtype (bf16 log-softmax over 150k entries is coarse);
#     here the math always runs in at least float32.
#   - mask: TRL computes every position and drops masked ones afterwards, so non-finite logits at
#     masked positions still turn gradients into NaN (0 * NaN); here masked rows are never read.
#   - labels=None: TRL's "batchmean" divides by the batch size B (a per-sequence sum), here by the
#     B * T tokens; "none" returns TRL's [N, V] elements, here per-token [B, T]; TRL's "mean" of
#     zero tokens is NaN, here 0.
#   - temperature: both divide both logits by it and neither rescales by temperature**2; TRL's
#     trainer ties it to the sampling temperature, here the loop decides.


def check_gkd_hyperparameters(beta: float, lmbda: float, temperature: float) -> None:
    """Raise ValueError naming the key when a GKD hyperparameter is out of range."""
    for key, value in (("beta", beta), ("lmbda", lmbda)):
        if not is_real_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"GKD key `{key}` must be a number in [0, 1], got {value!r}")
    if not is_real_number(temperature) or not 0.0 < temperature < math.inf:
        raise ValueError(f"GKD key `temperature` must be a finite number > 0, got {temperature!r}")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalized JSD between student and teacher next-token distributions (reference form).

    student_logits, teacher_logits: [B, T, V], already aligned so that position t predicts
    labels[:, t]; labels: [B, T] with -100 on positions to ignore (None: use every position).
    Both logits are divided by `temperature`; at unmasked positions they must be finite (a -inf
    logit gives NaN, as in TRL). See the module docstring for beta and the comment above for the
    reductions. Builds all [N, V] float32 intermediates at once: for training on large
    vocabularies use `chunked_generalized_jsd_loss` (same values and gradients).
    """
    check_jsd_arguments(student_logits, teacher_logits, labels, beta, temperature, reduction)
    token_mask = jsd_token_mask(labels, student_logits)                                            # [B, T]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits[token_mask].to(dtype) / temperature, dim=-1)                # [N, V] log S
    t = F.log_softmax(teacher_logits[token_mask].to(dtype) / temperature, dim=-1)                # [N, V] log T
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)                                                 # KL(P || Q) [N]
    if beta == 0:
        per_token = kl(t, s)
    elif beta == 1:
        per_token = kl(s, t)
    else:
        m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))                           # [N, V] log M
        per_token = beta * kl(t, m) + (1 - beta) * kl(s, m)                                       # [N]
    return reduce_per_token(per_token, token_mask, reduction, student_logits.shape[-1])


# ---------------------------------------------------------------------------------------------
# Step pieces: which sequences, on which tokens (pure or nearly so)
# ---------------------------------------------------------------------------------------------
def choose_sequence_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
    """Who writes this optimizer step's completions: "student" (probability lmbda), else "teacher" with
    seq_kd, else "dataset". A function of (seed, step) alone, so every process and every accumulation
    micro-step agree, and the global torch RNG (dropout, sampling) neither changes nor is changed by it."""
    if random.Random(seed + step).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


def source_metrics(writer: str, source_counts: dict, steps: int) -> dict:
    """Who wrote this step's completions, and the shares of this run's `steps` so far."""
    return {"on_policy": float(writer == "student"), "seq_kd": float(writer == "teacher"),
            "on_policy_share": source_counts["student"] / steps, "seq_kd_share": source_counts["teacher"] / steps}


def completion_row(prompt_ids: list[int], completion_ids: list[int]) -> dict:
    """[prompt | completion] with labels on the completion only (IGNORE_INDEX on the prompt)."""
    return {"input_ids": list(prompt_ids) + list(completion_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)}


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] bool: True at position t when t predicts a labelled token t + 1."""
    mask = torch.zeros_like(labels, dtype=torch.bool)  # [B, T]
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def completion_logits(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """[N, V] logits at the N True positions of `mask` [B, T] (row-major); no other position is projected
    onto the vocabulary (common.logprobs.lm_head_at)."""
    with lm_head_at(model, mask):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=0,
                       use_cache=False).logits
    if logits.dim() != 2 or logits.shape[0] != int(mask.sum()):
        raise RuntimeError(f"{type(model).__name__} returned logits {tuple(logits.shape)} for {int(mask.sum())} "
                           "kept positions; its forward must apply get_output_embeddings() to the hidden states")
    return logits


def gkd_loss_sum(student, teacher, batch: dict, beta: float, temperature: float) -> tuple[torch.Tensor, int]:
    """Summed generalized JSD over the completion tokens of one micro-batch; both models read the same tokens.

    batch: collate_sft output (input_ids, attention_mask, labels: [B, T]). Returns (loss sum, token count).
    """
    mask = prediction_mask(batch["labels"])                     # [B, T]
    student_logits = completion_logits(student, batch, mask)   # [N, V]
    with torch.no_grad():
        teacher_logits = completion_logits(teacher, batch, mask)  # [N, V]
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher logits have {teacher_logits.shape[-1]} vocabulary entries, the student's "
                         f"{student_logits.shape[-1]}")
    loss = chunked_generalized_jsd_loss(student_logits[None], teacher_logits[None], None, beta=beta,
                                        temperature=temperature, reduction="sum")  # [1, N, V] -> scalar
    return loss, int(mask.sum())


# ---------------------------------------------------------------------------------------------
# Start-up checks (before any model loads)
# ---------------------------------------------------------------------------------------------
def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """GKD compares the two models' distributions token by token: one vocabulary, one id per token."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda kv: kv[1])[:4]
        raise ValueError(
            f"the student tokenizer ({student_name}, {len(student_vocab)} tokens) and the teacher tokenizer "
            f"({teacher_name}, {len(teacher_vocab)} tokens) differ (e.g. token/id pairs {differing}); GKD "
            "compares next-token distributions id by id, so teacher and student must share one tokenizer")
    if student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        raise ValueError(f"the student's EOS id {student_tokenizer.eos_token_id} and the teacher's "
                         f"{teacher_tokenizer.eos_token_id} differ ({student_name} vs {teacher_name})")


def check_same_output_width(cfg) -> None:
    """The models' vocabulary sizes (rows of the output layer) must match too; read from config.json only."""
    from transformers import AutoConfig

    sizes = {}
    for key in ("model_name_or_path", "teacher_model_name_or_path"):
        model_config = AutoConfig.from_pretrained(getattr(cfg, key), trust_remote_code=cfg.trust_remote_code)
        sizes[key] = model_config.get_text_config().vocab_size
    if len(set(sizes.values())) != 1:
        raise ValueError(f"student and teacher output layers differ: vocab_size {sizes['model_name_or_path']} "
                         f"({cfg.model_name_or_path}) vs {sizes['teacher_model_name_or_path']} "
                         f"({cfg.teacher_model_name_or_path}); GKD needs logits over the same vocabulary")


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> None:
    with fail_fast():
        cfg = load_config(Config, argv, description=__doc__)

    # ----- setup -----------------------------------------------------------------------------
    from common.loop import claim_output_dir, micro_batches, start, training_run
    from common.models import prepare_frozen_model
    from common.runtime import bf16_supported, global_batches, shard, total_optimizer_steps

    accelerator, resume_path = start(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    use_bf16 = cfg.bf16 and bf16_supported()

    # ----- data and tokenizers (before models: bad input fails fast, nothing written) ----------
    with fail_fast():
        tokenizer, train_examples, eval_examples = load_checked_data(cfg)
        prompt_ids, dataset_sequences, eval_sequences = tokenize_examples(cfg, tokenizer, train_examples,
                                                                          eval_examples)
    total_steps = total_optimizer_steps(cfg, len(train_examples))
    steps_per_epoch = len(train_examples) // cfg.train_batch_size
    claimed = claim_output_dir(cfg, resume_path, accelerator.is_main_process)   # locked until the run ends
    logger.info("%d train examples, %d eval examples, %d optimizer steps (%d per epoch)", len(train_examples),
                len(eval_examples), total_steps, steps_per_epoch)

    # ----- models ----------------------------------------------------------------------------
    model, teacher = load_models(cfg, use_bf16)
    with training_run(cfg, accelerator, model, total_steps, resume_path, claimed) as run:
        model = run.model
        teacher = prepare_frozen_model(accelerator, teacher)  # eval, no grad; sharded for inference under ZeRO-3
        engines = make_engines(cfg, run, teacher, tokenizer, use_bf16)
        weights_version = engines["student"].sync_weights(model, version=run.start_step)
        trace_file = open_trace(cfg, run, rank)
        accuracy_rows = []
        if cfg.eval_generation_reward and eval_examples:
            accuracy_rows = greedy_accuracies(accelerator, cfg, run, engines, model, teacher, tokenizer, eval_examples)

        # ----- train -----------------------------------------------------------------------------
        model.train()
        step = run.start_step
        source_counts = {name: 0 for name in SEQUENCE_SOURCES}  # steps of this run per source, for the shares
        for step in range(run.start_step + 1, total_steps + 1):
            step_start = time.time()
            epoch, batch_in_epoch = divmod(step - 1, steps_per_epoch)
            batch_indices = global_batches(len(train_examples), cfg.train_batch_size, cfg.seed, epoch, cfg.shuffle)
            local_indices = shard(batch_indices[batch_in_epoch], rank, world)

            # ----- rollout: one decision per optimizer step, then the step's sequences ------------
            writer = choose_sequence_source(cfg.seed, step, cfg.lmbda, cfg.seq_kd)
            source_counts[writer] += 1
            sequences, finished, generation_seconds = step_sequences(
                cfg, run, engines, writer, local_indices, prompt_ids, dataset_sequences, step, weights_version)
            batches = [collate_sft(rows, tokenizer.pad_token_id)
                       for rows in micro_batches(sequences, cfg.per_device_train_batch_size)]
            # normalise by every completion token of the optimizer step, on all processes and micro-batches
            global_tokens = run.sum_over_processes(sum(int(prediction_mask(b["labels"]).sum()) for b in batches))

            # ----- update ----------------------------------------------------------------------------
            step_loss = torch.zeros((), device=accelerator.device)
            for micro_step, micro_batch in enumerate(batches):
                micro_batch = {k: v.to(accelerator.device) for k, v in micro_batch.items()}
                with accelerator.accumulate(model):
                    loss_sum, tokens = gkd_loss_sum(model, teacher, micro_batch, cfg.beta, cfg.temperature)
                    # accelerate divides by the accumulation steps and DDP averages over processes; undo both
                    accelerator.backward(loss_sum * cfg.gradient_accumulation_steps * world / global_tokens.clamp(min=1))
                step_loss += loss_sum.detach().float()
                write_trace(trace_file, step, micro_step, writer, micro_batch, tokens)
            grad_norm = run.optimizer_step(step_loss, step)
            sync_start = time.time()
            weights_version = engines["student"].sync_weights(model, version=step)
            sync_seconds = time.time() - sync_start

            # ----- log -------------------------------------------------------------------------------
            if run.should_log(step, grad_norm):
                counts = step_loss.new_tensor([float(finished), float(len(sequences))])   # stopped, sequences
                loss, stopped, count = accelerator.reduce(torch.cat([step_loss[None], counts]), "sum")
                run.tracker.log({"loss": (loss / global_tokens.clamp(min=1)).item(),
                                 **source_metrics(writer, source_counts, step - run.start_step),
                                 "completion_length": global_tokens.item() / max(count.item(), 1),
                                 "stop_ratio": stopped.item() / max(count.item(), 1), **run.step_metrics(grad_norm),
                                 "epoch": epoch + batch_in_epoch / steps_per_epoch,
                                 "generation_seconds": generation_seconds, "step_seconds": time.time() - step_start,
                                 "time/weight_sync": sync_seconds, "rollout/weights_version": float(weights_version)},
                                step)
            if cfg.do_eval and eval_sequences and (step % cfg.eval_steps == 0 or step == total_steps):
                run.tracker.log(evaluate_loss(accelerator, model, teacher, eval_sequences, cfg,
                                              tokenizer.pad_token_id), step)

            # ----- checkpoint --------------------------------------------------------------------------
            if run.checkpoint_or_stop(tokenizer, step):
                return

        # ----- final save and eval -----------------------------------------------------------------
        run.finish(tokenizer, step)
        if accuracy_rows:
            final_accuracy(accelerator, cfg, run, engines, model, tokenizer, eval_examples, accuracy_rows, step)
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------
# Set-up pieces: data, engines, traces, evals
# ---------------------------------------------------------------------------------------------
def load_models(cfg, use_bf16: bool):
    """The student (trained) and the teacher (frozen), dropout off when `disable_dropout`."""
    from common.models import disable_dropout, load_causal_lm, log_parameter_count
    model = load_causal_lm(cfg, use_bf16=use_bf16)
    teacher = load_causal_lm(cfg, cfg.teacher_model_name_or_path, use_bf16=use_bf16, trainable=False)
    for role, name, net in (("student", cfg.model_name_or_path, model),
                            ("teacher", cfg.teacher_model_name_or_path, teacher)):
        if cfg.disable_dropout:
            disable_dropout(net)
        log_parameter_count(role, name, net)
    return model, teacher


def step_sequences(cfg, run, engines: dict, writer: str, local_indices: list, prompt_ids: list, dataset_sequences: list,
                   step: int, weights_version: int):
    """This process's [prompt | completion] sequences of the step, written by `writer` -> (sequences, how many
    stopped on their own, sampling seconds)."""
    from common.loop import finite_sampling
    from common.rollout import SamplingParams
    if writer == "dataset":
        return [dataset_sequences[i] for i in local_indices], len(local_indices), 0.0
    start = time.time()
    # seeded per (step, process): reproducible and resumable, and the global RNG is left alone
    params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            seed=(cfg.seed + step) * run.accelerator.num_processes)
    with finite_sampling(run.accelerator, step, run.model):
        rollouts = engines[writer].generate([prompt_ids[i] for i in local_indices], params)
    if writer == "student" and any(r.weights_version != weights_version for r in rollouts):
        raise RuntimeError(f"step {step}: student rollouts not sampled with the current weights "
                           f"(version {weights_version}): a weight sync was missed")
    return ([completion_row(r.prompt_ids, r.completion_ids) for r in rollouts],
            sum(r.finish_reason == "stop" for r in rollouts), time.time() - start)


def load_checked_data(cfg):
    """-> (tokenizer, train examples, eval examples), after checking both models exist and share one vocabulary."""
    from common.models import check_model_source, load_tokenizer
    check_model_source("model_name_or_path", cfg.model_name_or_path)
    check_model_source("teacher_model_name_or_path", cfg.teacher_model_name_or_path)
    train_examples, eval_examples = load_train_eval(cfg)
    tokenizer = load_tokenizer(cfg)
    check_same_vocabulary(tokenizer, load_tokenizer(cfg, cfg.teacher_model_name_or_path),
                          cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.teacher_model_name_or_path)
    check_same_output_width(cfg)
    return tokenizer, train_examples, eval_examples


def tokenize_examples(cfg, tokenizer, train_examples: list, eval_examples: list):
    """-> (prompt ids to sample from, the dataset's [prompt | completion] sequences (None without a completion),
    the eval split's sequences). Raises ValueError for data the run cannot train on."""
    from common.rollout import truncate_prompts
    if cfg.lmbda < 1 and not cfg.seq_kd:  # off-policy steps train on the dataset's completions
        missing = [i for i, e in enumerate(train_examples) if e.completion is None]
        if missing:
            raise ValueError(f"{len(missing)} training examples have no completion (first: #{missing[0]}); "
                             "with lmbda < 1 and seq_kd=false the dataset's completions are used")
    if len(train_examples) < cfg.train_batch_size:
        raise ValueError(f"{len(train_examples)} training examples is fewer than train_batch_size="
                         f"{cfg.train_batch_size}")
    # sampled completions: prompts cut on the left so prompt + max_new_tokens fits max_seq_length
    prompt_ids, prompts_cut = truncate_prompts([encode_prompt(tokenizer, e.prompt) for e in train_examples],
                                               cfg.max_seq_length - cfg.max_new_tokens)
    dataset_sequences = [tokenize_example(e, tokenizer, cfg.max_seq_length) if e.completion is not None else None
                         for e in train_examples]
    sequences_cut, num_without_target = check_row_lengths([r for r in dataset_sequences if r is not None],
                                                          cfg.max_seq_length) if cfg.lmbda < 1 and not cfg.seq_kd \
        else (0, 0)
    eval_sequences = [tokenize_example(e, tokenizer, cfg.max_seq_length) for e in eval_examples
                      if e.completion is not None] if cfg.do_eval else []
    if prompts_cut:
        logger.warning("%d prompts are longer than max_seq_length - max_new_tokens = %d tokens and are cut on the "
                       "left for sampling", prompts_cut, cfg.max_seq_length - cfg.max_new_tokens)
    if sequences_cut:
        logger.warning("%d dataset rows reach max_seq_length=%d and are cut there (%d of them keep no completion "
                       "token)", sequences_cut, cfg.max_seq_length, num_without_target)
    return prompt_ids, dataset_sequences, eval_sequences


def make_engines(cfg, run, teacher, tokenizer, use_bf16: bool) -> dict:
    """A sampling engine per role: transformers generate on the model itself, or (use_vllm) a vLLM engine for each
    role that samples; the student's holds the training weights (resumed ones too). Closed when the run ends."""
    from common.rollout import HFGenerateEngine, make_engine, vllm_options
    accelerator, model = run.accelerator, run.model
    engines = {"student": HFGenerateEngine(model, tokenizer, accelerator, batch_size=cfg.generation_batch_size),
               "teacher": HFGenerateEngine(teacher, tokenizer, accelerator, batch_size=cfg.generation_batch_size)}
    if cfg.use_vllm:
        roles = {"student": cfg.model_name_or_path if cfg.lmbda > 0 else None,
                 "teacher": cfg.teacher_model_name_or_path if cfg.seq_kd and cfg.lmbda < 1 else None}
        engines.update({role: make_engine("vllm", model_path=path, tokenizer=tokenizer, accelerator=accelerator,
                                          **vllm_options(cfg, use_bf16)) for role, path in roles.items() if path})
    run.close_at_exit(*engines.values())
    return engines


def sampling_engine(engine):
    """The engine greedy_eval should sample with: None (transformers generate on the model) or a vLLM engine."""
    from common.rollout import HFGenerateEngine
    return None if isinstance(engine, HFGenerateEngine) else engine


def greedy_accuracies(accelerator, cfg, run, engines: dict, model, teacher, tokenizer, eval_examples) -> list:
    """Held-out greedy accuracy of the teacher and of the starting student: the first rows of the final table."""
    from common.evaluation import generation_accuracy
    results = {role: generation_accuracy(accelerator, cfg, net, tokenizer, eval_examples,
                                         engine=sampling_engine(engines[role]))
               for role, net in (("teacher", teacher), ("student", model))}
    run.tracker.log({"eval/teacher_greedy_accuracy": results["teacher"]["accuracy"],
                     "eval/greedy_accuracy": results["student"]["accuracy"]}, run.start_step)
    return [(f"teacher {cfg.teacher_model_name_or_path}", results["teacher"]),
            (f"student {cfg.model_name_or_path} at step {run.start_step}", results["student"])]


def final_accuracy(accelerator, cfg, run, engines: dict, model, tokenizer, eval_examples, rows: list, step: int) -> None:
    """The trained student's held-out greedy accuracy, logged and printed under the teacher's and its start's."""
    from common.evaluation import format_accuracy_table, generation_accuracy
    result = generation_accuracy(accelerator, cfg, model, tokenizer, eval_examples,
                                 engine=sampling_engine(engines["student"]))
    run.tracker.log({"eval/greedy_accuracy": result["accuracy"]}, step)
    if accelerator.is_main_process:
        print(format_accuracy_table([*rows, (f"student after GKD (step {step}) {cfg.output_dir}", result)]), flush=True)


def open_trace(cfg, run, rank: int):
    """activate_debugging_logs: a per-process record of each micro-step's sequence source (closed with the run);
    else None."""
    if not cfg.activate_debugging_logs:
        return None
    (Path(cfg.output_dir) / "gkd_trace").mkdir(parents=True, exist_ok=True)
    trace_file = open(Path(cfg.output_dir) / "gkd_trace" / f"rank{rank}.jsonl", "a" if run.start_step else "w")
    run.close_at_exit(trace_file)
    return trace_file


def write_trace(trace_file, step: int, micro_step: int, writer: str, batch: dict, tokens: int) -> None:
    if trace_file is not None:
        trace_file.write(json.dumps({"step": step, "micro_step": micro_step, "source": writer,
                                     "sequences": int(batch["input_ids"].shape[0]), "completion_tokens": tokens}) + "\n")
        trace_file.flush()


def evaluate_loss(accelerator, model, teacher, eval_sequences: list[dict], cfg, pad_token_id: int) -> dict:
    """GKD loss on the eval split's dataset completions (deterministic: no sampling)."""
    from common.models import eval_mode
    totals = torch.zeros(2, device=accelerator.device)  # [loss sum, tokens]
    rank, world = accelerator.process_index, accelerator.num_processes
    local = eval_sequences[rank::world]
    per_rank = math.ceil(len(eval_sequences) / world)
    with eval_mode(model), torch.no_grad():
        for start in range(0, per_rank, cfg.per_device_eval_batch_size):
            sequences = local[start: start + cfg.per_device_eval_batch_size]
            if not sequences:  # every process runs the same number of forwards (ZeRO-3); this one counts nothing
                sequences = [completion_row(eval_sequences[0]["input_ids"], [])]
            batch = {k: v.to(accelerator.device) for k, v in collate_sft(sequences, pad_token_id).items()}
            loss_sum, tokens = gkd_loss_sum(model, teacher, batch, cfg.beta, cfg.temperature)
            totals += torch.stack([loss_sum.detach().float(), torch.tensor(float(tokens), device=totals.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    return {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item()}


if __name__ == "__main__":
    main()
