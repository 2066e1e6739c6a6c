"""Generalized JSD loss of train_gkd.py: closed forms, masking, TRL agreement, chunked == plain."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from train_gkd import (
    check_gkd_hyperparameters,
    chunked_generalized_jsd_loss,
    generalized_jsd_loss,
)

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
REDUCTIONS = ("batchmean", "sum", "mean", "none")
B, T, V = 3, 5, 17


def _logits(seed, scale=2.0, shape=(B, T, V)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _labels(seed=0):
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    labels[0, :2] = -100  # a prompt
    labels[1, -1] = -100  # padding
    labels[2, :] = -100  # a row with nothing to learn
    return labels


def _closed_form(student_logits, teacher_logits, beta):
    """Per-token generalized JSD [N] straight from probabilities (float64), no log-space tricks."""
    student_probs = torch.softmax(student_logits, -1)
    teacher_probs = torch.softmax(teacher_logits, -1)
    if beta == 0:
        return (teacher_probs * (teacher_probs / student_probs).log()).sum(-1)
    if beta == 1:
        return (student_probs * (student_probs / teacher_probs).log()).sum(-1)
    mixture = (1 - beta) * student_probs + beta * teacher_probs
    return (beta * (teacher_probs * (teacher_probs / mixture).log()).sum(-1)
            + (1 - beta) * (student_probs * (student_probs / mixture).log()).sum(-1))


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", (1.0, 0.5))
def test_identical_distributions_give_zero(beta, temperature):
    logits = _logits(0)
    for loss_fn in (generalized_jsd_loss, chunked_generalized_jsd_loss):
        per_token = loss_fn(logits, logits.clone(), _labels(), beta, temperature, reduction="none")
        torch.testing.assert_close(per_token, torch.zeros(B, T, dtype=torch.float64), atol=1e-12, rtol=0)


def test_beta_ends_are_forward_and_reverse_kl_as_kl_div():
    student, teacher = _logits(0), _logits(1)
    student_logp = F.log_softmax(student, -1).reshape(-1, V)  # [B*T, V]
    teacher_logp = F.log_softmax(teacher, -1).reshape(-1, V)
    # F.kl_div(input, target) = KL(target || input); "batchmean" divides by the B*T rows
    forward_kl = F.kl_div(student_logp, teacher_logp.exp(), reduction="batchmean")
    reverse_kl = F.kl_div(teacher_logp, student_logp.exp(), reduction="batchmean")
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=0.0), forward_kl)
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=1.0), reverse_kl)
    assert not torch.isclose(forward_kl, reverse_kl, rtol=1e-3)  # the ends really differ


@pytest.mark.parametrize("beta", BETAS)
def test_matches_probability_space_closed_form(beta):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    mask = labels != -100
    expected = _closed_form(student[mask], teacher[mask], beta)  # [N]
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, labels, beta), expected.mean())
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, labels, beta, reduction="none")[mask], expected)


def test_mixture_is_stable_for_far_apart_distributions():
    student, teacher = _logits(0, scale=300.0), _logits(1, scale=300.0)
    for beta in (1e-6, 0.5, 1 - 1e-6):
        loss = chunked_generalized_jsd_loss(student.float(), teacher.float(), beta=beta)
        assert torch.isfinite(loss) and loss > 0


def test_symmetric_at_half():
    student, teacher, labels = _logits(0), _logits(1), _labels()
    torch.testing.assert_close(
        generalized_jsd_loss(student, teacher, labels, beta=0.5),
        generalized_jsd_loss(teacher, student, labels, beta=0.5),
    )
    # and only there: beta=0.1 is not symmetric
    assert not torch.isclose(generalized_jsd_loss(student, teacher, labels, beta=0.1),
                             generalized_jsd_loss(teacher, student, labels, beta=0.1), rtol=1e-3)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_fn", (generalized_jsd_loss, chunked_generalized_jsd_loss))
def test_temperature_divides_both_logits(beta, loss_fn):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    temperature = 2.5
    torch.testing.assert_close(
        loss_fn(student, teacher, labels, beta, temperature),
        loss_fn(student / temperature, teacher / temperature, labels, beta, 1.0),
    )
    assert not torch.isclose(loss_fn(student, teacher, labels, beta, temperature),
                             loss_fn(student, teacher, labels, beta, 1.0), rtol=1e-3)


@pytest.mark.parametrize("loss_fn", (generalized_jsd_loss, chunked_generalized_jsd_loss))
def test_reductions(loss_fn):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    mask = labels != -100
    per_token = loss_fn(student, teacher, labels, 0.3, reduction="none")
    assert per_token.shape == (B, T)
    assert torch.all(per_token[~mask] == 0) and torch.all(per_token[mask] > 0)
    num_tokens = int(mask.sum())
    torch.testing.assert_close(loss_fn(student, teacher, labels, 0.3, reduction="sum"), per_token.sum())
    torch.testing.assert_close(loss_fn(student, teacher, labels, 0.3), per_token.sum() / num_tokens)
    torch.testing.assert_close(loss_fn(student, teacher, labels, 0.3, reduction="mean"),
                               per_token.sum() / (num_tokens * V))
    # no labels: every position counts, batchmean averages over the B*T tokens
    torch.testing.assert_close(loss_fn(student, teacher, None, 0.3),
                               loss_fn(student, teacher, None, 0.3, reduction="none").mean())


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("loss_fn", (generalized_jsd_loss, chunked_generalized_jsd_loss))
@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_masked_positions_change_nothing(loss_fn, beta):
    labels = _labels()
    masked = labels == -100
    teacher = _logits(1)
    clean = _logits(0).requires_grad_()
    dirty_values = _logits(0)
    dirty_values[masked] = float("nan")  # never read, so cannot poison values or gradients
    dirty_values[0, 0, 3] = float("inf")
    dirty = dirty_values.requires_grad_()
    dirty_teacher = teacher.clone()
    dirty_teacher[masked] = float("-inf")
    for reduction in REDUCTIONS:
        clean_loss = loss_fn(clean, teacher, labels, beta, reduction=reduction)
        dirty_loss = loss_fn(dirty, dirty_teacher, labels, beta, reduction=reduction)
        torch.testing.assert_close(dirty_loss, clean_loss)
        (clean_grad,) = torch.autograd.grad(clean_loss.sum(), clean)
        (dirty_grad,) = torch.autograd.grad(dirty_loss.sum(), dirty)
        torch.testing.assert_close(dirty_grad, clean_grad)
        assert torch.all(clean_grad[masked] == 0) and clean_grad[~masked].abs().sum() > 0


@pytest.mark.parametrize("loss_fn", (generalized_jsd_loss, chunked_generalized_jsd_loss))
def test_all_masked_is_zero_not_nan(loss_fn):
    student = _logits(0).requires_grad_()
    labels = torch.full((B, T), -100)
    for beta in BETAS:
        for reduction in REDUCTIONS:
            loss = loss_fn(student, _logits(1), labels, beta, reduction=reduction)
            (grad,) = torch.autograd.grad(loss.sum(), student)
            assert torch.all(loss == 0) and torch.all(grad == 0), (beta, reduction)


# --------------------------------------------------------------------------- TRL reference
@pytest.fixture(scope="module")
def trl_generalized_jsd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
def test_matches_trl(trl_generalized_jsd_loss, beta, reduction):
    # TRL special-cases beta 0 and 1 with F.kl_div(student, teacher) = KL(T || S) and
    # F.kl_div(teacher, student) = KL(S || T): the same forward and reverse KL as here, so all five
    # betas are compared. TRL's "batchmean" divides by the unmasked tokens only when labels are
    # given (by B without labels) and its "mean"/"none" are per (token, vocabulary) element, so
    # "batchmean" and "sum" with labels are where the definitions agree.
    student, teacher, labels = _logits(0), _logits(1), _labels()
    labels[2, 1] = 7  # keep one token in the last row so every row contributes
    ours_input, trl_input = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = generalized_jsd_loss(ours_input, teacher, labels, beta, 1.0, reduction)
    chunked = chunked_generalized_jsd_loss(student, teacher, labels, beta, 1.0, reduction, chunk_size=4)
    reference = trl_generalized_jsd_loss(trl_input, teacher, labels, beta=beta, temperature=1.0, reduction=reduction)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(chunked, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, ours_input)[0], torch.autograd.grad(reference, trl_input)[0])


# --------------------------------------------------------------------------- chunked == plain
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", (1.0, 0.7, 2.0))
def test_chunked_equals_plain_on_logits(beta, temperature):
    teacher, labels = _logits(1), _labels()
    weights = _logits(2, scale=1.0, shape=(B, T))  # arbitrary per-token weights for "none"
    for reduction in REDUCTIONS:
        for chunk_size in (1, 3, 100):
            plain_input, chunked_input = _logits(0).requires_grad_(), _logits(0).requires_grad_()
            plain = generalized_jsd_loss(plain_input, teacher, labels, beta, temperature, reduction)
            chunked = chunked_generalized_jsd_loss(
                chunked_input, teacher, labels, beta, temperature, reduction, chunk_size=chunk_size)
            torch.testing.assert_close(chunked, plain)
            scalar = (lambda loss: (loss * weights).sum()) if reduction == "none" else (lambda loss: loss)
            scalar(plain).backward()
            scalar(chunked).backward()
            torch.testing.assert_close(chunked_input.grad, plain_input.grad)


def test_chunked_gradient_matches_finite_differences():
    labels = _labels()[:, :3]
    teacher = _logits(1, shape=(B, 3, 7))
    for beta in (0.0, 0.3, 1.0):
        student = _logits(0, shape=(B, 3, 7)).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: chunked_generalized_jsd_loss(x, teacher, labels, beta, 1.5, "none", chunk_size=2),
            (student,))


def test_chunked_reads_non_contiguous_views_and_low_precision():
    full_student, full_teacher = _logits(0, shape=(B, T + 1, V)), _logits(1, shape=(B, T + 1, V))
    student, teacher = full_student[:, :-1], full_teacher[:, 1:]  # shifted views, as a loop aligns them
    assert not student.is_contiguous()
    labels = _labels()
    expected = generalized_jsd_loss(student, teacher, labels, 0.5)
    torch.testing.assert_close(chunked_generalized_jsd_loss(student, teacher, labels, 0.5, chunk_size=2), expected)
    bf16_student = student.to(torch.bfloat16).requires_grad_()
    bf16_loss = chunked_generalized_jsd_loss(bf16_student, teacher.to(torch.bfloat16), labels, 0.5)
    assert bf16_loss.dtype == torch.float32  # the math runs in float32
    torch.testing.assert_close(bf16_loss.double(), expected, rtol=0.05, atol=0)
    bf16_loss.backward()
    assert bf16_student.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- argument checks
def test_check_gkd_hyperparameters_names_the_key():
    check_gkd_hyperparameters(beta=0.0, lmbda=1.0, temperature=0.9)
    check_gkd_hyperparameters(beta=1, lmbda=0, temperature=2)
    for kwargs, key in (
        (dict(beta=1.5, lmbda=0.5, temperature=1.0), "beta"),
        (dict(beta=-0.1, lmbda=0.5, temperature=1.0), "beta"),
        (dict(beta=math.nan, lmbda=0.5, temperature=1.0), "beta"),
        (dict(beta=0.5, lmbda=1.01, temperature=1.0), "lmbda"),
        (dict(beta=0.5, lmbda="0.5", temperature=1.0), "lmbda"),
        (dict(beta=0.5, lmbda=0.5, temperature=0.0), "temperature"),
        (dict(beta=0.5, lmbda=0.5, temperature=math.inf), "temperature"),
    ):
        with pytest.raises(ValueError, match=f"`{key}`"):
            check_gkd_hyperparameters(**kwargs)


def test_bad_loss_arguments_raise():
    student, teacher = _logits(0), _logits(1)
    with pytest.raises(ValueError, match="same"):
        generalized_jsd_loss(student[..., :-1], teacher)
    with pytest.raises(ValueError, match="labels"):
        generalized_jsd_loss(student, teacher, labels=torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="beta"):
        chunked_generalized_jsd_loss(student, teacher, beta=1.2)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(student, teacher, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_generalized_jsd_loss(student, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="teacher"):
        chunked_generalized_jsd_loss(student, teacher.requires_grad_())
    with pytest.raises(ValueError, match="same"):
        chunked_generalized_jsd_loss(_logits(3, shape=(B, T, 4)), _logits(1))
