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
from common.config import ConfigError, config_to_dict, fail_fast, load_config
from common.data import check_row_lengths, collate_sft, encode_prompt, load_train_eval, tokenize_example
from common.logprobs import lm_head_at

logger = logging.getLogger("train_gkd")

IGNORE_INDEX = -100
REDUCTIONS = ("batchmean", "sum", "mean", "none")
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
        if not _is_real_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"GKD key `{key}` must be a number in [0, 1], got {value!r}")
    if not _is_real_number(temperature) or not 0.0 < temperature < math.inf:
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
    _check_loss_arguments(student_logits, teacher_logits, labels, beta, temperature, reduction)
    token_mask = _token_mask(labels, student_logits)  # [B, T]
    per_token = _per_token_generalized_jsd(
        student_logits[token_mask], teacher_logits[token_mask], beta, temperature
    )  # [N]
    return _reduce(per_token, token_mask, reduction, student_logits.shape[-1])


def chunked_generalized_jsd_loss(
    student_logits_or_hidden: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    chunk_size: Optional[int] = None,
    student_lm_head_weight: Optional[torch.Tensor] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`generalized_jsd_loss` computed over chunks of unmasked tokens, for training.

    student_logits_or_hidden: [B, T, V] student logits, or [B, T, H] final hidden states when
    `student_lm_head_weight` [V, H] (and optionally `student_lm_head_bias` [V]) is given; then
    the student's logits are computed chunk by chunk and never exist as a whole. (Models that
    transform logits after the head, e.g. soft-capping, need the logits form.)
    teacher_logits: [B, T, V], treated as constants (the teacher is frozen).

    Only the N unmasked positions are read, `chunk_size` tokens at a time (default: about
    16M float32 elements, 64 MiB, per [chunk, V] intermediate). Backward recomputes each chunk,
    so memory beyond the inputs and their gradients is O(chunk_size * V).
    """
    _check_loss_arguments(None, teacher_logits, labels, beta, temperature, reduction)
    batch_size, seq_len, vocab_size = teacher_logits.shape
    if teacher_logits.requires_grad:
        raise ValueError(
            "teacher_logits requires grad, but the chunked GKD loss treats the teacher as fixed: "
            "compute the teacher under torch.no_grad() or pass teacher_logits.detach()"
        )
    if student_lm_head_weight is None:
        if student_lm_head_bias is not None:
            raise ValueError("student_lm_head_bias was given without student_lm_head_weight")
        if student_logits_or_hidden.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits_or_hidden.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} must have the same [B, T, V] shape"
            )
    else:
        hidden_size = student_logits_or_hidden.shape[-1]
        if student_logits_or_hidden.shape != (batch_size, seq_len, hidden_size):
            raise ValueError(
                f"student hidden states {tuple(student_logits_or_hidden.shape)} must be "
                f"[B, T, H] with B, T = {batch_size}, {seq_len} from teacher_logits"
            )
        if student_lm_head_weight.shape != (vocab_size, hidden_size):
            raise ValueError(
                f"student_lm_head_weight {tuple(student_lm_head_weight.shape)} must be [V, H] = "
                f"{(vocab_size, hidden_size)}"
            )
        if student_lm_head_bias is not None and student_lm_head_bias.shape != (vocab_size,):
            raise ValueError(
                f"student_lm_head_bias {tuple(student_lm_head_bias.shape)} must be [V] = ({vocab_size},)"
            )
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    token_mask = _token_mask(labels, teacher_logits)  # [B, T]
    batch_index, time_index = token_mask.nonzero(as_tuple=True)  # [N], [N]: unmasked positions
    per_token = _ChunkedGeneralizedJSD.apply(
        student_logits_or_hidden, student_lm_head_weight, student_lm_head_bias,
        teacher_logits, batch_index, time_index, float(beta), float(temperature), chunk_size,
    )  # [N]
    return _reduce(per_token, token_mask, reduction, vocab_size)


class _ChunkedGeneralizedJSD(torch.autograd.Function):
    """Per-token generalized JSD [N] at the given positions, chunk by chunk; backward recomputes.

    Rows are gathered per chunk by (batch, time) index, so inputs that are non-contiguous views
    (e.g. `logits[:, :-1]`) are never copied whole.
    """

    @staticmethod
    def forward(ctx, student, head_weight, head_bias, teacher_logits, batch_index, time_index,
                beta, temperature, chunk_size):
        ctx.save_for_backward(student, head_weight, head_bias, teacher_logits, batch_index, time_index)
        ctx.beta, ctx.temperature, ctx.chunk_size = beta, temperature, chunk_size
        compute_dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
        per_token = teacher_logits.new_empty(batch_index.shape[0], dtype=compute_dtype)  # [N]
        for chunk in _chunks(batch_index.shape[0], chunk_size):
            position = (batch_index[chunk], time_index[chunk])  # [c], [c]
            per_token[chunk] = _per_token_generalized_jsd(
                _student_logits_at(student, head_weight, head_bias, position),  # [c, V]
                teacher_logits[position],  # [c, V]
                beta, temperature,
            )
        return per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_token):  # grad_per_token: [N]
        student, head_weight, head_bias, teacher_logits, batch_index, time_index = ctx.saved_tensors
        need_student, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Each student row is written once, so its gradient can live in the input's dtype; the
        # head's gradients add up over chunks, so they accumulate in at least float32.
        grad_student = torch.zeros_like(student) if need_student else None  # [B, T, V or H]
        accumulate_dtype = None if head_weight is None else torch.promote_types(head_weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(head_weight, dtype=accumulate_dtype) if need_weight else None  # [V, H]
        grad_bias = torch.zeros_like(head_bias, dtype=accumulate_dtype) if need_bias else None  # [V]
        for chunk in _chunks(batch_index.shape[0], ctx.chunk_size):
            position = (batch_index[chunk], time_index[chunk])  # [c], [c]
            grad_logits = _generalized_jsd_student_logit_grad(
                _student_logits_at(student, head_weight, head_bias, position),  # [c, V]
                teacher_logits[position],  # [c, V]
                ctx.beta, ctx.temperature,
            )  # [c, V]: d per_token / d student logits
            grad_logits.mul_(grad_per_token[chunk, None].to(grad_logits.dtype))
            if head_weight is None:
                if need_student:
                    grad_student.index_put_(position, grad_logits.to(student.dtype))
                continue
            if need_student:
                grad_hidden = grad_logits.to(head_weight.dtype) @ head_weight  # [c, H]
                grad_student.index_put_(position, grad_hidden.to(student.dtype))
            if need_weight:
                grad_weight.addmm_(grad_logits.t().to(accumulate_dtype), student[position].to(accumulate_dtype))
            if need_bias:
                grad_bias.add_(grad_logits.sum(0).to(accumulate_dtype))
        if need_weight:
            grad_weight = grad_weight.to(head_weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(head_bias.dtype)
        return grad_student, grad_weight, grad_bias, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Loss internals (pure)
# ---------------------------------------------------------------------------------------------
def _per_token_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """[N, V], [N, V] -> [N] divergence per token, summed over the vocabulary (autograd-safe)."""
    student_logp = _log_softmax(student_logits, temperature)  # [N, V]
    teacher_logp = _log_softmax(teacher_logits, temperature)  # [N, V]
    if beta == 0:
        return _kl(teacher_logp, student_logp)  # forward KL(T || S)
    if beta == 1:
        return _kl(student_logp, teacher_logp)  # reverse KL(S || T)
    mixture_logp = _mixture_log_probs(student_logp, teacher_logp, beta)  # [N, V]
    return beta * _kl(teacher_logp, mixture_logp) + (1 - beta) * _kl(student_logp, mixture_logp)


def _generalized_jsd_student_logit_grad(student_logits, teacher_logits, beta, temperature):
    """[N, V], [N, V] -> [N, V] d(per-token JSD)/d(student logits), float32, in closed form.

    With s, m the student and mixture log-probs and S = exp(s):
    d/dS_i [beta KL(T||M) + (1-beta) KL(S||M)] = (1-beta) (s_i - m_i); through the softmax,
    d/dz = (1-beta)/temperature * S * ((s - m) - KL(S||M)). Forward KL: (S - T)/temperature;
    reverse KL: S * ((s - t) - KL(S||T))/temperature. In-place steps keep ~4 [N, V] alive.
    """
    student_logp = _log_softmax(student_logits, temperature)  # [N, V]
    teacher_logp = _log_softmax(teacher_logits, temperature)  # [N, V]
    if beta == 0:
        return student_logp.exp_().sub_(teacher_logp.exp_()).div_(temperature)
    if beta == 1:
        log_ratio, scale = teacher_logp.neg_().add_(student_logp), 1.0 / temperature  # s - t
    else:
        mixture_logp = _mixture_log_probs(student_logp, teacher_logp, beta)
        del teacher_logp
        log_ratio, scale = mixture_logp.neg_().add_(student_logp), (1 - beta) / temperature  # s - m
    student_probs = student_logp.exp_()  # [N, V]
    kl_student = (student_probs * log_ratio).sum(-1, keepdim=True)  # [N, 1]
    return log_ratio.sub_(kl_student).mul_(student_probs).mul_(scale)


def _log_softmax(logits, temperature):
    """[N, V] -> [N, V] log-softmax of logits / temperature, in at least float32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _mixture_log_probs(student_logp, teacher_logp, beta):
    """log((1 - beta) * S + beta * T) from log-probs, stable (logaddexp), 0 < beta < 1."""
    return torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))


def _kl(p_logp, q_logp):
    """[N, V], [N, V] -> [N] KL(P || Q) = sum_v P (log P - log Q)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def _chunks(num_tokens, chunk_size):
    """Slices covering range(num_tokens), chunk_size at a time."""
    return [slice(start, start + chunk_size) for start in range(0, num_tokens, chunk_size)]


def _student_logits_at(student, head_weight, head_bias, position):
    """[c, V] student logits at (batch, time) positions, from logits or hidden states + head."""
    if head_weight is None:
        return student[position]
    return F.linear(student[position], head_weight, head_bias)


def _token_mask(labels, logits):
    """[B, T] True where the loss applies."""
    if labels is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    return labels != IGNORE_INDEX


def _reduce(per_token, token_mask, reduction, vocab_size):
    """[N] per-token divergences -> the requested reduction (see the table above)."""
    num_tokens = per_token.shape[0]
    if reduction == "batchmean":
        return per_token.sum() / max(num_tokens, 1)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(num_tokens * vocab_size, 1)
    full = per_token.new_zeros(token_mask.shape)  # [B, T]
    return full.masked_scatter(token_mask, per_token)


def _check_loss_arguments(student_logits, teacher_logits, labels, beta, temperature, reduction):
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [B, T, V], got shape {tuple(teacher_logits.shape)}")
    if student_logits is not None and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same [B, T, V] shape"
        )
    if labels is not None and labels.shape != teacher_logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] = {tuple(teacher_logits.shape[:2])}")
    if not _is_real_number(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not _is_real_number(temperature) or not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _is_real_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


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
    logging.basicConfig(level=logging.DEBUG if cfg.activate_debugging_logs else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # ----- setup -----------------------------------------------------------------------------
    from accelerate.utils import set_seed

    from common.checkpoint import PreemptionFlag, load_checkpoint, resolve_resume_path, save_model
    from common.loop import (SKIPPED, NonFiniteCounter, check_output_dir, checkpoint_or_stop, claim_output_dir,
                             ensure_finite_weights, finite_sampling, optimizer_step, resumed_step, step_metrics)
    from common.models import (check_model_source, count_parameters, disable_dropout, load_causal_lm, load_tokenizer,
                               prepare_frozen_model)
    from common.rollout import HFGenerateEngine, SamplingParams, make_engine, truncate_prompts, vllm_options
    from common.runtime import (bf16_supported, global_batches, make_accelerator, make_optimizer, make_scheduler,
                                shard, total_optimizer_steps)
    from common.tracking import Tracker

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    use_bf16 = cfg.bf16 and bf16_supported()

    # ----- data and tokenizers (before models: bad input fails fast, nothing written) ----------
    with fail_fast():
        check_model_source("model_name_or_path", cfg.model_name_or_path)
        check_model_source("teacher_model_name_or_path", cfg.teacher_model_name_or_path)
        resume_path = resolve_resume_path(cfg.resume_from_checkpoint, cfg.output_dir)
        check_output_dir(cfg, resume_path, accelerator.is_main_process)
        train_examples, eval_examples = load_train_eval(cfg)
        tokenizer = load_tokenizer(cfg)
        teacher_tokenizer = load_tokenizer(cfg, cfg.teacher_model_name_or_path)
        check_same_vocabulary(tokenizer, teacher_tokenizer, cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                              cfg.teacher_model_name_or_path)
        check_same_output_width(cfg)
        if cfg.lmbda < 1 and not cfg.seq_kd:  # off-policy steps train on the dataset's completions
            missing = [i for i, e in enumerate(train_examples) if e.completion is None]
            if missing:
                raise ValueError(f"{len(missing)} training examples have no completion (first: #{missing[0]}); "
                                 "with lmbda < 1 and seq_kd=false the dataset's completions are used")
        if len(train_examples) < cfg.train_batch_size:
            raise ValueError(f"{len(train_examples)} training examples is fewer than train_batch_size="
                             f"{cfg.train_batch_size}")
        # sampled completions: prompts cut on the left so prompt + max_new_tokens fits max_seq_length
        prompt_ids, num_cut = truncate_prompts([encode_prompt(tokenizer, e.prompt) for e in train_examples],
                                               cfg.max_seq_length - cfg.max_new_tokens)
        dataset_rows = [tokenize_example(e, tokenizer, cfg.max_seq_length) if e.completion is not None else None
                        for e in train_examples]
        num_cut, num_without_target = check_row_lengths([r for r in dataset_rows if r is not None],
                                                        cfg.max_seq_length) if cfg.lmbda < 1 and not cfg.seq_kd \
            else (0, 0)
        eval_with_completion = [e for e in eval_examples if e.completion is not None]
        eval_rows = [tokenize_example(e, tokenizer, cfg.max_seq_length) for e in eval_with_completion] \
            if cfg.do_eval else []
    if num_cut:
        logger.warning("%d prompts are longer than max_seq_length - max_new_tokens = %d tokens and are cut on the "
                       "left for sampling", num_cut, cfg.max_seq_length - cfg.max_new_tokens)
    if num_cut:
        logger.warning("%d dataset rows reach max_seq_length=%d and are cut there (%d of them keep no completion "
                       "token)", num_cut, cfg.max_seq_length, num_without_target)
    total_steps = total_optimizer_steps(cfg, len(train_examples))
    steps_per_epoch = len(train_examples) // cfg.train_batch_size
    # locked, config.yaml written, stale metrics rows dropped; the lock is held until the process exits
    run_dir = claim_output_dir(cfg, resume_path, resumed_step(resume_path), accelerator.is_main_process)
    logger.info("%d train examples, %d eval examples, %d optimizer steps (%d per epoch)", len(train_examples),
                len(eval_examples), total_steps, steps_per_epoch)

    # ----- models ----------------------------------------------------------------------------
    model = load_causal_lm(cfg, use_bf16=use_bf16)
    teacher = load_causal_lm(cfg, cfg.teacher_model_name_or_path, use_bf16=use_bf16, trainable=False)
    if cfg.disable_dropout:
        disable_dropout(model)
        disable_dropout(teacher)
    for name, m in (("student", model), ("teacher", teacher)):
        total_params, trainable_params = count_parameters(m)
        logger.info("%s %s: %.2fM parameters, %.2fM trainable", name,
                    cfg.model_name_or_path if name == "student" else cfg.teacher_model_name_or_path,
                    total_params / 1e6, trainable_params / 1e6)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # after prepare: DeepSpeed may regroup the parameters, and the schedule must drive the groups it steps
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    teacher = prepare_frozen_model(accelerator, teacher)  # eval, no grad; sharded for inference under ZeRO-3

    start_step = 0
    if resume_path is not None:
        start_step = load_checkpoint(accelerator, resume_path)["step"]
        logger.info("resumed from %s at step %d", resume_path, start_step)
    tracker = Tracker(cfg, accelerator.is_main_process, config_to_dict(cfg), total_steps, resume=start_step > 0)
    preemption = PreemptionFlag(cfg.output_dir, accelerator.is_main_process)
    accum = cfg.gradient_accumulation_steps
    nonfinite = NonFiniteCounter(cfg.max_consecutive_nonfinite)
    engines = {"student": HFGenerateEngine(model, tokenizer, accelerator, batch_size=cfg.generation_batch_size),
               "teacher": HFGenerateEngine(teacher, tokenizer, accelerator, batch_size=cfg.generation_batch_size)}
    if cfg.use_vllm:   # an engine per role that samples; the student's holds the training weights (resumed too)
        roles = {"student": cfg.model_name_or_path if cfg.lmbda > 0 else None,
                 "teacher": cfg.teacher_model_name_or_path if cfg.seq_kd and cfg.lmbda < 1 else None}
        engines.update({role: make_engine("vllm", model_path=path, tokenizer=tokenizer, accelerator=accelerator,
                                          **vllm_options(cfg, use_bf16)) for role, path in roles.items() if path})
    weights_version = engines["student"].sync_weights(model, version=start_step)
    trace_file = None
    if cfg.activate_debugging_logs:  # per-process record of each micro-step's sequence source
        (Path(cfg.output_dir) / "gkd_trace").mkdir(parents=True, exist_ok=True)
        trace_file = open(Path(cfg.output_dir) / "gkd_trace" / f"rank{rank}.jsonl", "a" if start_step else "w")

    def to_device(batch: dict) -> dict:
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def evaluate() -> dict:
        """GKD loss on the eval split's dataset completions (deterministic: no sampling)."""
        model.eval()
        totals = torch.zeros(2, device=accelerator.device)  # [loss sum, tokens]
        local = eval_rows[rank::world]
        per_rank = math.ceil(len(eval_rows) / world)
        with torch.no_grad():
            for start in range(0, per_rank, cfg.per_device_eval_batch_size):
                rows = local[start: start + cfg.per_device_eval_batch_size]
                if not rows:  # every process runs the same number of forwards (ZeRO-3); this one counts nothing
                    rows = [completion_row(eval_rows[0]["input_ids"], [])]
                loss_sum, tokens = gkd_loss_sum(model, teacher, to_device(collate_sft(rows, tokenizer.pad_token_id)),
                                                cfg.beta, cfg.temperature)
                totals[0] += loss_sum.detach().float()
                totals[1] += tokens
        totals = accelerator.reduce(totals, reduction="sum")
        model.train()
        return {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item()}

    reward_fn = None
    accuracy_rows = []
    if cfg.eval_generation_reward and eval_examples:
        from common.evaluation import greedy_eval
        from common.rewards import get_reward_factory
        reward_fn = get_reward_factory(cfg.eval_generation_reward)(cfg)

        def greedy_accuracy(which) -> dict:
            role = engines["teacher" if which is teacher else "student"]
            return greedy_eval(accelerator, which, tokenizer, eval_examples, reward_fn, cfg.eval_max_new_tokens,
                               cfg.eval_generation_samples, engine=None if isinstance(role, HFGenerateEngine) else role)

        teacher_result, student_result = greedy_accuracy(teacher), greedy_accuracy(model)
        accuracy_rows += [(f"teacher {cfg.teacher_model_name_or_path}", teacher_result),
                          (f"student {cfg.model_name_or_path} at step {start_step}", student_result)]
        tracker.log({"eval/teacher_greedy_accuracy": teacher_result["accuracy"],
                     "eval/greedy_accuracy": student_result["accuracy"]}, start_step)

    # ----- train -----------------------------------------------------------------------------
    model.train()
    step = start_step
    source_counts = {name: 0 for name in SEQUENCE_SOURCES}  # steps of this run per source, for the shares
    for step in range(start_step + 1, total_steps + 1):
        step_start = time.time()
        epoch, batch_in_epoch = divmod(step - 1, steps_per_epoch)
        batch_indices = global_batches(len(train_examples), cfg.train_batch_size, cfg.seed, epoch, cfg.shuffle)
        local_indices = shard(batch_indices[batch_in_epoch], rank, world)

        # ----- rollout: one decision per optimizer step, then the step's sequences ------------
        source = choose_sequence_source(cfg.seed, step, cfg.lmbda, cfg.seq_kd)
        source_counts[source] += 1
        generation_seconds, finished = 0.0, len(local_indices)
        if source == "dataset":
            rows = [dataset_rows[i] for i in local_indices]
        else:
            generation_start = time.time()
            # seeded per (step, process): reproducible and resumable, and the global RNG is left alone
            params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                    seed=(cfg.seed + step) * world)
            with finite_sampling(accelerator, step, model):
                rollouts = engines[source].generate([prompt_ids[i] for i in local_indices], params)
            if source == "student" and any(r.weights_version != weights_version for r in rollouts):
                raise RuntimeError(f"step {step}: student rollouts not sampled with the current weights "
                                   f"(version {weights_version}): a weight sync was missed")
            rows = [completion_row(r.prompt_ids, r.completion_ids) for r in rollouts]
            finished = sum(r.finish_reason == "stop" for r in rollouts)
            generation_seconds = time.time() - generation_start
        micro_batches = [collate_sft(rows[j: j + cfg.per_device_train_batch_size], tokenizer.pad_token_id)
                         for j in range(0, len(rows), cfg.per_device_train_batch_size)]
        # normalise by every completion token of the optimizer step, on all processes and micro-batches
        local_tokens = sum(int(prediction_mask(mb["labels"]).sum()) for mb in micro_batches)
        global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum")

        # ----- update ----------------------------------------------------------------------------
        step_loss = torch.zeros((), device=accelerator.device)
        for micro_step, micro_batch in enumerate(micro_batches):
            micro_batch = to_device(micro_batch)
            with accelerator.accumulate(model):
                loss_sum, tokens = gkd_loss_sum(model, teacher, micro_batch, cfg.beta, cfg.temperature)
                # accelerate divides by the accumulation steps and DDP averages over processes; undo both
                accelerator.backward(loss_sum * accum * world / global_tokens.clamp(min=1))
            step_loss += loss_sum.detach().float()
            if trace_file is not None:
                trace_file.write(json.dumps({"step": step, "micro_step": micro_step, "source": source,
                                             "sequences": int(micro_batch["input_ids"].shape[0]),
                                             "completion_tokens": tokens}) + "\n")
        if trace_file is not None:
            trace_file.flush()
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step_loss, nonfinite,
                                   step)
        sync_start = time.time()
        weights_version = engines["student"].sync_weights(model, version=step)
        sync_seconds = time.time() - sync_start

        # ----- log -------------------------------------------------------------------------------
        if step % cfg.logging_steps == 0 or step == total_steps or grad_norm == SKIPPED:
            totals = accelerator.reduce(torch.stack([step_loss, torch.tensor(float(finished), device=step_loss.device),
                                                     torch.tensor(float(len(rows)), device=step_loss.device)]), "sum")
            elapsed = time.time() - step_start
            tracker.log({"loss": (totals[0] / global_tokens.clamp(min=1)).item(),
                         "on_policy": float(source == "student"), "seq_kd": float(source == "teacher"),
                         "on_policy_share": source_counts["student"] / (step - start_step),
                         "seq_kd_share": source_counts["teacher"] / (step - start_step),
                         "completion_length": global_tokens.item() / max(totals[2].item(), 1),
                         "stop_ratio": totals[1].item() / max(totals[2].item(), 1),
                         **step_metrics(grad_norm, nonfinite),
                         "lr": scheduler.get_last_lr()[0], "epoch": epoch + batch_in_epoch / steps_per_epoch,
                         "generation_seconds": generation_seconds, "step_seconds": elapsed,
                         "time/weight_sync": sync_seconds, "rollout/weights_version": float(weights_version)}, step)
        if cfg.do_eval and eval_rows and (step % cfg.eval_steps == 0 or step == total_steps):
            tracker.log(evaluate(), step)

        # ----- checkpoint --------------------------------------------------------------------------
        if checkpoint_or_stop(accelerator, preemption, model, tokenizer, cfg, step,
                              {"epoch": epoch, "batch_in_epoch": batch_in_epoch + 1}):
            if trace_file is not None:
                trace_file.close()
            for engine in engines.values():
                engine.close()
            tracker.close()
            return

    # ----- final save and eval -----------------------------------------------------------------
    if trace_file is not None:
        trace_file.close()
    ensure_finite_weights(accelerator, step, model)
    save_model(accelerator, model, tokenizer, Path(cfg.output_dir))
    if accelerator.is_main_process:
        logger.info("saved final model to %s", cfg.output_dir)
    if cfg.push_to_hub:
        from common.checkpoint import push_final_model
        push_final_model(accelerator, cfg.output_dir, cfg.hub_model_id)
    if reward_fn is not None:
        from common.evaluation import format_accuracy_table
        result = greedy_accuracy(model)
        accuracy_rows.append((f"student after GKD (step {step}) {cfg.output_dir}", result))
        tracker.log({"eval/greedy_accuracy": result["accuracy"]}, step)
        if accelerator.is_main_process:
            print(format_accuracy_table(accuracy_rows), flush=True)
    for engine in engines.values():
        engine.close()
    tracker.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
