"""Chunked per-token logprobs equal the naive fp32 log-softmax, values and gradients."""
import pytest
import torch

from common.ops import masked_mean, masked_sum, selective_log_softmax, selective_log_softmax_from_hidden


def naive_logps(logits, index, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("sliced", [False, True])
def test_selective_log_softmax_matches_naive(temperature, chunk_size, sliced):
    torch.manual_seed(0)
    full = (3 * torch.randn(3, 9, 97)).requires_grad_()
    logits = full[:, :-1] if sliced else full  # the shifted view a causal LM loss uses
    index = torch.randint(0, 97, logits.shape[:-1])
    weights = torch.randn(index.shape)

    logps, entropy = selective_log_softmax(logits, index, temperature=temperature, chunk_size=chunk_size,
                                           return_entropy=True)
    expected = naive_logps(logits, index, temperature)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, naive_entropy(logits, temperature), atol=1e-5, rtol=0)
    assert logps.dtype == torch.float32 and not entropy.requires_grad

    before = full.detach().clone()
    (grad,) = torch.autograd.grad((weights * logps).sum(), full)
    (expected_grad,) = torch.autograd.grad((weights * expected).sum(), full)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)
    assert torch.equal(full, before)  # backward leaves the logits alone


def test_selective_log_softmax_bf16_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 50).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, 50, (2, 6))
    logps = selective_log_softmax(logits, index, chunk_size=4)
    expected = naive_logps(logits, index)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, expected_grad)


def test_selective_log_softmax_other_ranks():
    logits = torch.randn(7, 11, requires_grad=True)  # [N, V]
    index = torch.randint(0, 11, (7,))
    torch.testing.assert_close(selective_log_softmax(logits, index, chunk_size=3), naive_logps(logits, index))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size, vocab_chunk_size", [(1, None), (4, None), (None, None), (4, 10), (None, 83),
                                                          (3, 1)])
def test_from_hidden_matches_naive(temperature, chunk_size, vocab_chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)  # [B, T, H]
    weight = torch.randn(83, 16, requires_grad=True)  # [V, H]
    index = torch.randint(0, 83, (2, 7))
    weights = torch.randn(2, 7)

    logps, entropy = selective_log_softmax_from_hidden(hidden, weight, index, temperature=temperature,
                                                       chunk_size=chunk_size, return_entropy=True,
                                                       vocab_chunk_size=vocab_chunk_size)
    logits = hidden @ weight.T
    expected = naive_logps(logits, index, temperature)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, naive_entropy(logits, temperature), atol=1e-5, rtol=0)

    grads = torch.autograd.grad((weights * logps).sum(), [hidden, weight])
    expected_grads = torch.autograd.grad((weights * expected).sum(), [hidden, weight])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_from_hidden_frozen_weight_and_sliced_hidden():
    torch.manual_seed(0)
    full = torch.randn(2, 8, 16, requires_grad=True)
    hidden = full[:, :-1]
    weight = torch.randn(40, 16)  # frozen lm_head
    index = torch.randint(0, 40, (2, 7))
    logps = selective_log_softmax_from_hidden(hidden, weight, index, chunk_size=3, vocab_chunk_size=9)
    expected = naive_logps(hidden @ weight.T, index)
    (grad,) = torch.autograd.grad(logps.sum(), full)
    (expected_grad,) = torch.autograd.grad(expected.sum(), full)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab_chunk_size", [None, 7])
def test_from_hidden_bf16(vocab_chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(60, 16).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, 60, (2, 5))
    logps = selective_log_softmax_from_hidden(hidden, weight, index, chunk_size=3, vocab_chunk_size=vocab_chunk_size)
    expected = naive_logps(hidden @ weight.T, index)  # what lm_head(...).float() gives
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(logps.sum(), [hidden, weight])
    expected_grads = torch.autograd.grad(expected.sum(), [hidden, weight])
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=2e-2, rtol=2e-2)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="leading dims"):
        selective_log_softmax(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[V, H=4\]"):
        selective_log_softmax_from_hidden(torch.randn(2, 3, 4), torch.randn(5, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_log_softmax(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(x, mask).item() == 3.0
    assert masked_mean(x, mask).item() == 1.5
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))  # empty row -> 0
    torch.testing.assert_close(masked_mean(x, torch.tensor([1, 0, 1]), dim=0), torch.tensor([2.5, 0.0, 4.5]))


@pytest.mark.parametrize("low_precision_gemm", [False, True])
def test_weight_grad_accumulation_paths(low_precision_gemm):
    # The CUDA path (bf16 GEMM, fp32 accumulator) and the CPU path (fp32 GEMM) agree with one big GEMM.
    from common.ops import _accumulate_weight_grad

    torch.manual_seed(0)
    grad_logits, hidden = torch.randn(12, 30), torch.randn(12, 8).to(torch.bfloat16)
    accumulator = torch.zeros(30, 8)
    for start in range(0, 12, 5):
        _accumulate_weight_grad(accumulator, grad_logits[start:start + 5], hidden[start:start + 5], low_precision_gemm)
    expected = grad_logits.T @ hidden.float()
    torch.testing.assert_close(accumulator, expected, atol=5e-2 if low_precision_gemm else 1e-5, rtol=1e-2)


def test_from_hidden_under_autocast():
    # fp32 weights with bf16 autocast (mixed precision): backward recomputes with the forward's bf16 logits.
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(70, 16, requires_grad=True)
    index = torch.randint(0, 70, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = selective_log_softmax_from_hidden(hidden, weight, index, chunk_size=5)
        expected = naive_logps(hidden @ weight.T, index)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(logps.sum(), [hidden, weight])
    expected_grads = torch.autograd.grad(expected.sum(), [hidden, weight])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=3e-2, rtol=0)  # 7e-2 without the autocast replay
