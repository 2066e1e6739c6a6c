"""Shared tensor ops: per-token logprobs computed in chunks, masked reductions.

Per-token logprobs at a large vocabulary are the memory peak of RL and distillation steps: the
naive `log_softmax(logits.float()).gather(...)` holds an fp32 copy of the `[B, T, V]` logits,
its log-softmax, and the same again in backward. The functions here walk the rows in chunks and
recompute what backward needs, so at most one fp32 `[chunk, V]` block exists at a time:

- `selective_log_softmax(logits, index)`: logits given; no fp32 `[B, T, V]` is made.
- `selective_log_softmax_from_hidden(hidden, weight, index)`: final hidden states and the lm_head
  weight given; the `[B, T, V]` logits never exist, forward or backward.

Both return fp32 `[B, T]` logprobs and, on request, the per-token entropy (no gradient).

- `chunked_generalized_jsd_loss(student, teacher, labels)`: GKD's generalized JSD over the unmasked tokens, a
  chunk of tokens at a time, backward in closed form and recomputed per chunk (train_gkd.py holds the plain
  formula it is tested against and the table of reductions).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
JSD_REDUCTIONS = ("batchmean", "sum", "mean", "none")

# Rows per chunk default to the number whose fp32 `[rows, V]` block takes about this many bytes.
CHUNK_BYTES = 64 * 2**20


def _chunk_rows(chunk_size: Optional[int], vocab_size: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_BYTES // (4 * vocab_size))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _logsumexp_and_entropy(scaled: torch.Tensor, want_entropy: bool):
    """`scaled`: [c, V] fp32 logits / temperature -> logsumexp [c] and entropy [c] (or None)."""
    lse = torch.logsumexp(scaled, dim=-1)  # [c]
    if not want_entropy:
        return lse, None
    logp = scaled - lse.unsqueeze(-1)  # [c, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [c]; lse - E_p[z] would cancel badly at low entropy
    return lse, entropy


def _shaped_outputs(ctx, logps: torch.Tensor, entropy: Optional[torch.Tensor], shape: torch.Size):
    """An autograd Function's outputs: logps [shape] and, when computed, the entropy [shape] (no gradient)."""
    if entropy is None:
        return logps.view(shape)
    entropy = entropy.view(shape)
    ctx.mark_non_differentiable(entropy)
    return logps.view(shape), entropy


class _RowChunks:
    """Row ranges over the leading dims of a `[..., V]` tensor without copying it.

    A contiguous tensor is viewed as `[N, V]`; a non-contiguous `[B, T, V]` one (e.g. `logits[:, :-1]`)
    is walked one batch row at a time, so chunks never cross a batch row.
    """

    def __init__(self, shape: torch.Size, rows: int, contiguous: bool):
        self.num_rows = 1
        for size in shape[:-1]:
            self.num_rows *= size
        self.inner = shape[-2] if (not contiguous and len(shape) == 3) else self.num_rows
        self.ranges = [
            (start, min(start + rows, outer + self.inner))
            for outer in range(0, self.num_rows, self.inner)
            for start in range(outer, outer + self.inner, rows)
        ]

    def take(self, tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if tensor.is_contiguous():
            return tensor.view(-1, tensor.shape[-1])[start:end]
        batch = start // self.inner
        return tensor[batch, start - batch * self.inner : end - batch * self.inner]


class _ChunkedSelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, rows, want_entropy):
        # [B, T, V] stays as given (sliced views included); other ranks are flattened to [N, V].
        logits_rows = logits if logits.dim() == 3 else logits.reshape(-1, logits.shape[-1])
        chunks = _RowChunks(logits_rows.shape, rows, logits_rows.is_contiguous())
        flat_index = index.reshape(-1)  # [N]
        logps = torch.empty(chunks.num_rows, dtype=torch.float32, device=logits.device)  # [N]
        lse_all = torch.empty_like(logps)  # [N]
        entropy = torch.empty_like(logps) if want_entropy else None
        for start, end in chunks.ranges:
            scaled = chunks.take(logits_rows, start, end).float() / temperature  # [c, V]
            lse, chunk_entropy = _logsumexp_and_entropy(scaled, want_entropy)
            picked = scaled.gather(-1, flat_index[start:end].unsqueeze(-1)).squeeze(-1)  # [c]
            logps[start:end] = picked - lse
            lse_all[start:end] = lse
            if want_entropy:
                entropy[start:end] = chunk_entropy
        ctx.save_for_backward(logits_rows, flat_index, lse_all)
        ctx.temperature, ctx.chunks, ctx.logits_shape = temperature, chunks, logits.shape
        return _shaped_outputs(ctx, logps, entropy, index.shape)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        logits_rows, flat_index, lse_all = ctx.saved_tensors
        chunks, temperature = ctx.chunks, ctx.temperature
        grad_flat = grad_logps.reshape(-1).float()  # [N]
        grad_logits = torch.empty(logits_rows.shape, dtype=logits_rows.dtype, device=logits_rows.device)
        for start, end in chunks.ranges:
            # d logp_i / d x_j = (onehot_ij - softmax_ij) / temperature, built in one fp32 block.
            block = chunks.take(logits_rows, start, end).float() / temperature  # [c, V], a copy even for fp32
            block.sub_(lse_all[start:end].unsqueeze(-1)).exp_()  # softmax
            scale = (grad_flat[start:end] / temperature).unsqueeze(-1)  # [c, 1]
            block.mul_(-scale)
            block.scatter_add_(-1, flat_index[start:end].unsqueeze(-1), scale)
            chunks.take(grad_logits, start, end).copy_(block)
        return grad_logits.view(ctx.logits_shape), None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    return_entropy: bool = False,
):
    """log_softmax(logits / temperature) at `index`, chunked over rows.

    logits: [..., V] (any float dtype; a non-contiguous [B, T, V] slice is not copied);
    index: [...] token ids. Returns fp32 logprobs [...] and, with `return_entropy`, the entropy
    [...] of each row's distribution (no gradient). `chunk_size`: rows per chunk (default: a
    64 MiB fp32 block). Peak extra memory: one fp32 [chunk, V] block plus the logits' gradient.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and index {tuple(index.shape)} disagree on leading dims")
    rows = _chunk_rows(chunk_size, logits.shape[-1])
    return _ChunkedSelectiveLogSoftmax.apply(logits, index, float(temperature), rows, return_entropy)


def _accumulate_weight_grad(
    grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor, low_precision_gemm: bool
) -> None:
    """grad_weight [V, H] fp32 += grad_logits[c, V].T @ hidden [c, H], without an fp32 [V, H] temporary."""
    if hidden.dtype == torch.float32 or not low_precision_gemm:
        # fp32 GEMM straight into the accumulator (on CPU no slower than a bf16 one).
        grad_weight.addmm_(grad_logits.T, hidden.float())
    else:
        # Tensor-core GEMM in the model dtype; the in-place add promotes without an fp32 copy.
        grad_weight.add_(grad_logits.T.to(hidden.dtype) @ hidden)


class _ChunkedLinearLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, index, temperature, rows, rows_given, want_entropy, vocab_rows):
        hidden_rows = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        flat_index = index.reshape(-1)  # [N]
        num_rows = hidden_rows.shape[0]
        logps = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)  # [N]
        lse_all = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if want_entropy else None
        for start in range(0, num_rows, rows):
            end = min(start + rows, num_rows)
            # Matmul in the model's dtype, then fp32: the same numbers as lm_head(...).float().
            scaled = (hidden_rows[start:end] @ weight.T).float().div_(temperature)  # [c, V]
            lse, chunk_entropy = _logsumexp_and_entropy(scaled, want_entropy)
            picked = scaled.gather(-1, flat_index[start:end].unsqueeze(-1)).squeeze(-1)  # [c]
            logps[start:end] = picked - lse
            lse_all[start:end] = lse
            if want_entropy:
                entropy[start:end] = chunk_entropy
        ctx.save_for_backward(hidden_rows, weight, flat_index, lse_all)
        ctx.temperature, ctx.hidden_shape = temperature, hidden.shape
        ctx.rows, ctx.rows_given, ctx.vocab_rows = rows, rows_given, vocab_rows
        # Backward must recompute the logits under the same autocast state as this forward.
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        return _shaped_outputs(ctx, logps, entropy, index.shape)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        # Tiles of [row chunk, vocab slice]: the vocab slice is the outer loop, so the weight gradient is
        # accumulated in fp32 one slice at a time and written to a gradient in the weight's dtype -- never an
        # fp32 [V, H] beside it (at V=150k, H=4096 that pair alone would be 3.4 GiB in bf16).
        hidden_rows, weight, flat_index, lse_all = ctx.saved_tensors
        temperature = ctx.temperature
        device_type, autocast_dtype, autocast_enabled = ctx.autocast
        grad_flat = grad_logps.reshape(-1).float()  # [N]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows, vocab = hidden_rows.shape[0], weight.shape[0]
        vocab_step = ctx.vocab_rows
        row_step = ctx.rows if ctx.rows_given else max(1, CHUNK_BYTES // (4 * min(vocab_step, vocab)))
        grad_hidden = torch.zeros(hidden_rows.shape, dtype=torch.float32, device=hidden_rows.device) \
            if need_hidden else None  # [N, H], summed over vocab slices
        grad_weight = torch.empty_like(weight) if need_weight else None  # [V, H]
        for v0 in range(0, vocab, vocab_step):
            v1 = min(v0 + vocab_step, vocab)
            weight_slice = weight[v0:v1]  # [v, H]
            if need_weight:   # fp32 accumulator of this slice (the gradient itself when it is fp32)
                slice_grad = grad_weight[v0:v1] if weight.dtype == torch.float32 else \
                    torch.empty(weight_slice.shape, dtype=torch.float32, device=weight.device)
                slice_grad.zero_()
            for start in range(0, num_rows, row_step):
                end = min(start + row_step, num_rows)
                chunk_hidden = hidden_rows[start:end]  # [c, H]
                with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                    block = chunk_hidden @ weight_slice.T  # [c, v] recomputed logits
                block = block.float().div_(temperature)
                block.sub_(lse_all[start:end].unsqueeze(-1)).exp_()  # softmax over the whole vocabulary
                scale = (grad_flat[start:end] / temperature).unsqueeze(-1)  # [c, 1]
                block.mul_(-scale)
                local = flat_index[start:end] - v0  # [c] target ids relative to this slice
                inside = ((local >= 0) & (local < v1 - v0)).unsqueeze(-1)  # [c, 1]; no host sync on GPU
                block.scatter_add_(-1, local.clamp(0, v1 - v0 - 1).unsqueeze(-1), scale * inside)  # d loss / d logits
                if need_hidden:
                    grad_hidden[start:end] += block.to(weight.dtype) @ weight_slice  # [c, H]
                if need_weight:
                    _accumulate_weight_grad(slice_grad, block, chunk_hidden, low_precision_gemm=weight.is_cuda)
            if need_weight and slice_grad.data_ptr() != grad_weight[v0:v1].data_ptr():
                grad_weight[v0:v1] = slice_grad.to(weight.dtype)
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden_rows.dtype).view(ctx.hidden_shape)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def selective_log_softmax_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    return_entropy: bool = False,
    vocab_chunk_size: Optional[int] = None,
):
    """log_softmax((hidden @ weight.T) / temperature) at `index`; the logits exist one chunk at a time.

    hidden: [..., H] final hidden states (after the last norm); weight: [V, H] the lm_head weight
    (a bias-free lm_head, as in Llama/Qwen); index: [...] token ids. Backward recomputes the logits
    in [chunk_size rows, vocab_chunk_size ids] tiles and accumulates the weight gradient in fp32 one
    vocabulary slice at a time (default: slices whose fp32 block takes about CHUNK_BYTES / 4).
    Returns fp32 logprobs [...] and, with `return_entropy`, the entropy [...] (no gradient).
    Under ZeRO-3 or FSDP the caller must pass the gathered (full) weight.
    """
    _check_temperature(temperature)
    if hidden.shape[:-1] != index.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and index {tuple(index.shape)} disagree on leading dims")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    rows = _chunk_rows(chunk_size, weight.shape[0])
    if vocab_chunk_size is None:
        vocab_chunk_size = max(1, CHUNK_BYTES // 4 // (4 * weight.shape[1]))
    elif vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be a positive number of vocabulary ids, got {vocab_chunk_size}")
    return _ChunkedLinearLogSoftmax.apply(hidden, weight, index, float(temperature), rows, chunk_size is not None,
                                          return_entropy, vocab_chunk_size)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of `x` where `mask` is nonzero (mask broadcast to x), over `dim` or everything."""
    masked = x * mask.to(x.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is nonzero; 0 where there are none."""
    count = mask.to(x.dtype).expand_as(x)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Generalized JSD (GKD), chunked
# ---------------------------------------------------------------------------------------------------------------------

def chunked_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """`generalized_jsd_loss` computed over chunks of unmasked tokens, for training.

    student_logits: [B, T, V]. (train_gkd.py already projects only the completion positions onto the
    vocabulary, and the teacher's logits must exist there anyway, so no hidden-state variant is kept.)
    teacher_logits: [B, T, V], treated as constants (the teacher is frozen).

    Only the N unmasked positions are read, `chunk_size` tokens at a time (default: about
    16M float32 elements, 64 MiB, per [chunk, V] intermediate). Backward recomputes each chunk,
    so memory beyond the inputs and their gradients is O(chunk_size * V).
    """
    check_jsd_arguments(None, teacher_logits, labels, beta, temperature, reduction)
    batch_size, seq_len, vocab_size = teacher_logits.shape
    if teacher_logits.requires_grad:
        raise ValueError(
            "teacher_logits requires grad, but the chunked GKD loss treats the teacher as fixed: "
            "compute the teacher under torch.no_grad() or pass teacher_logits.detach()"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same [B, T, V] shape"
        )
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    token_mask = jsd_token_mask(labels, teacher_logits)  # [B, T]
    batch_index, time_index = token_mask.nonzero(as_tuple=True)  # [N], [N]: unmasked positions
    per_token = _ChunkedGeneralizedJSD.apply(
        student_logits, teacher_logits, batch_index, time_index, float(beta), float(temperature), chunk_size,
    )  # [N]
    return reduce_per_token(per_token, token_mask, reduction, vocab_size)


class _ChunkedGeneralizedJSD(torch.autograd.Function):
    """Per-token generalized JSD [N] at the given positions, chunk by chunk; backward recomputes.

    Rows are gathered per chunk by (batch, time) index, so inputs that are non-contiguous views
    (e.g. `logits[:, :-1]`) are never copied whole.
    """

    @staticmethod
    def forward(ctx, student, teacher_logits, batch_index, time_index, beta, temperature, chunk_size):
        ctx.save_for_backward(student, teacher_logits, batch_index, time_index)
        ctx.beta, ctx.temperature, ctx.chunk_size = beta, temperature, chunk_size
        compute_dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
        per_token = teacher_logits.new_empty(batch_index.shape[0], dtype=compute_dtype)  # [N]
        for chunk in _chunks(batch_index.shape[0], chunk_size):
            position = (batch_index[chunk], time_index[chunk])  # [c], [c]
            per_token[chunk] = _per_token_generalized_jsd(
                student[position],  # [c, V]
                teacher_logits[position],  # [c, V]
                beta, temperature,
            )
        return per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_token):  # grad_per_token: [N]
        student, teacher_logits, batch_index, time_index = ctx.saved_tensors
        # each student row is written once, so its gradient can live in the input's dtype
        grad_student = torch.zeros_like(student)  # [B, T, V]
        for chunk in _chunks(batch_index.shape[0], ctx.chunk_size):
            position = (batch_index[chunk], time_index[chunk])  # [c], [c]
            grad_logits = _generalized_jsd_student_logit_grad(
                student[position], teacher_logits[position], ctx.beta, ctx.temperature,
            )  # [c, V]: d per_token / d student logits
            grad_logits.mul_(grad_per_token[chunk, None].to(grad_logits.dtype))
            grad_student.index_put_(position, grad_logits.to(student.dtype))
        return grad_student, None, None, None, None, None, None


def _per_token_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """[N, V], [N, V] -> [N] divergence per token, summed over the vocabulary (autograd-safe)."""
    student_logp = _jsd_log_softmax(student_logits, temperature)  # [N, V]
    teacher_logp = _jsd_log_softmax(teacher_logits, temperature)  # [N, V]
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
    student_logp = _jsd_log_softmax(student_logits, temperature)  # [N, V]
    teacher_logp = _jsd_log_softmax(teacher_logits, temperature)  # [N, V]
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


def _jsd_log_softmax(logits, temperature):
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


def jsd_token_mask(labels, logits):
    """[B, T] True where the loss applies."""
    if labels is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    return labels != IGNORE_INDEX


def reduce_per_token(per_token, token_mask, reduction, vocab_size):
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


def check_jsd_arguments(student_logits, teacher_logits, labels, beta, temperature, reduction):
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [B, T, V], got shape {tuple(teacher_logits.shape)}")
    if student_logits is not None and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same [B, T, V] shape"
        )
    if labels is not None and labels.shape != teacher_logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] = {tuple(teacher_logits.shape[:2])}")
    if not is_real_number(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not is_real_number(temperature) or not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in JSD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {JSD_REDUCTIONS}, got {reduction!r}")


def is_real_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
