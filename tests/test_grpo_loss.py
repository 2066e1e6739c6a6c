"""grpo_loss and group_advantages against closed forms."""
import math

import pytest
import torch

from train_grpo import group_advantages, grpo_loss


def _single_token_loss(ratio: float, advantage: float, **kwargs):
    """One sequence of one token whose ratio to the rollout policy is `ratio`."""
    logps = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, metrics = grpo_loss(logps, old, None, torch.tensor([advantage], dtype=torch.float64),
                              torch.ones(1, 1), beta=0.0, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.item(), grad.item(), metrics


@pytest.mark.parametrize(
    "ratio, advantage, loss, grad, low, high",
    [
        (1.1, 1.0, -1.1, -1.1, 0, 0),    # inside the trust region: plain ratio * A
        (1.5, 1.0, -1.2, 0.0, 0, 1),     # A > 0, ratio above 1 + eps_high: clipped, no gradient
        (0.5, 1.0, -0.5, -0.5, 0, 0),    # A > 0, ratio below 1 - eps_low: min keeps the unclipped term
        (0.5, -1.0, 0.8, 0.0, 1, 0),     # A < 0, ratio below 1 - eps_low: clipped, no gradient
        (1.5, -1.0, 1.5, 1.5, 0, 0),     # A < 0, ratio above 1 + eps_high: min keeps the unclipped term
        (0.9, -2.0, 1.8, 1.8, 0, 0),
    ],
)
def test_clipping_regions(ratio, advantage, loss, grad, low, high):
    got_loss, got_grad, metrics = _single_token_loss(ratio, advantage)
    assert got_loss == pytest.approx(loss)
    assert got_grad == pytest.approx(grad)  # d(ratio)/d(logp) = ratio
    assert metrics["clip_ratio/low"].item() == low
    assert metrics["clip_ratio/high"].item() == high
    assert metrics["clip_ratio/region"].item() == max(low, high)
    assert "kl" not in metrics


def test_asymmetric_epsilons():
    assert _single_token_loss(1.25, 1.0, epsilon_high=0.28)[0] == pytest.approx(-1.25)
    assert _single_token_loss(1.25, 1.0, epsilon_high=0.2)[0] == pytest.approx(-1.2)
    assert _single_token_loss(0.75, -1.0, epsilon_low=0.1)[0] == pytest.approx(0.9)


MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_type, kwargs, denominators",
    [
        # ratio 1: loss = -sum_b A_b |m_b| / D (or -mean_b A_b for grpo); gradient -A_b / D_b per token
        ("grpo", {}, [3 * 3, 3 * 1, 3 * 1]),
        ("bnpo", {}, [4, 4, 4]),
        ("dr_grpo", {"max_completion_length": 8}, [3 * 8] * 3),
        ("dapo", {"num_items_in_batch": 10}, [10, 10, 10]),
    ],
)
def test_ratio_one_is_policy_gradient(loss_type, kwargs, denominators):
    logps = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), None, ADVANTAGES, MASK, loss_type=loss_type, beta=0.0, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    expected_grad = -ADVANTAGES.unsqueeze(1) / torch.tensor(denominators, dtype=torch.float64).unsqueeze(1) * MASK
    torch.testing.assert_close(grad, expected_grad)
    if loss_type == "grpo":  # the empty third sequence still counts in the mean over sequences
        expected_loss = -(1.0 - 2.0 + 0.0) / 3
    else:
        expected_loss = -(1.0 * 3 - 2.0 * 1) / denominators[0]
    assert loss.item() == pytest.approx(expected_loss)


def test_old_logps_none_means_on_policy():
    logps = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    a, _ = grpo_loss(logps, None, None, ADVANTAGES, MASK, beta=0.0)
    b, _ = grpo_loss(logps, logps.detach(), None, ADVANTAGES, MASK, beta=0.0)
    assert a.item() == pytest.approx(b.item())


def test_reductions_on_uneven_masks():
    ratios = torch.tensor([[1.0, 1.1, 0.9], [1.05, 3.0, 5.0]], dtype=torch.float64)  # masked tokens clip-free garbage
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, 2.0], dtype=torch.float64)
    logps, old = ratios.log(), torch.zeros(2, 3, dtype=torch.float64)
    # per-token losses on unmasked tokens: [-1, -1.1, -0.9] and [-2.1]
    expected = {"grpo": (-1.0 - 2.1) / 2, "bnpo": (-3.0 - 2.1) / 4, "dr_grpo": -5.1 / (2 * 4), "dapo": -5.1 / 10}
    for loss_type, value in expected.items():
        loss, _ = grpo_loss(logps, old, None, advantages, mask, loss_type=loss_type, beta=0.0,
                            max_completion_length=4, num_items_in_batch=torch.tensor(10))
        assert loss.item() == pytest.approx(value), loss_type


def test_kl_zero_when_reference_equals_policy():
    logps = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with_kl, metrics = grpo_loss(logps, None, logps.detach().clone(), ADVANTAGES, MASK, beta=0.5)
    without, _ = grpo_loss(logps, None, None, ADVANTAGES, MASK, beta=0.0)
    assert metrics["kl"].item() == 0.0
    assert with_kl.item() == pytest.approx(without.item())


def test_k3_hand_value_and_gradient():
    # ref - logp = ln 2: k3 = 2 - ln 2 - 1; d k3 / d logp = 1 - exp(ref - logp) = -1
    logps = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 1), math.log(2.0), dtype=torch.float64)
    loss, metrics = grpo_loss(logps, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), beta=0.1)
    k3 = 1.0 - math.log(2.0)
    assert metrics["kl"].item() == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad.item() == pytest.approx(-0.1)


def test_kl_metric_is_token_mean_over_mask():
    logps = torch.zeros(2, 2, dtype=torch.float64)
    ref = torch.tensor([[math.log(2.0), 5.0], [0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 1]])
    _, metrics = grpo_loss(logps, None, ref, torch.zeros(2, dtype=torch.float64), mask, beta=0.04)
    assert metrics["kl"].item() == pytest.approx((1.0 - math.log(2.0)) / 3)


def test_bad_arguments_raise():
    logps, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, None, None, adv, mask, loss_type="dr_grpo", beta=0.0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logps, None, None, adv, mask, loss_type="dapo", beta=0.0)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, None, None, adv, mask, loss_type="ppo", beta=0.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, None, None, torch.zeros(3), mask, beta=0.0)


# ---------------------------------------------------------------- group advantages
def test_group_scaling_and_zero_spread_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages, stats = group_advantages(rewards, num_generations=4)
    std = math.sqrt(1.0 / 3.0)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1.0] * 4)
    torch.testing.assert_close(advantages, expected)
    assert stats["frac_zero_std_groups"] == 0.5
    assert stats["frac_reward_none"] == 0.0
    assert stats["reward_mean"] == pytest.approx(10 / 8)


def test_none_rewards_excluded_and_get_zero_advantage():
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 1.0, nan, nan, 3.0, nan, nan, nan, nan, nan])
    advantages, stats = group_advantages(rewards, num_generations=4)
    assert not torch.isnan(advantages).any()
    std = math.sqrt(1.0 / 3.0)  # unbiased std of [1, 0, 1]
    torch.testing.assert_close(advantages[:4], torch.tensor([1 / 3, 0.0, -2 / 3, 1 / 3]) / (std + 1e-4))
    torch.testing.assert_close(advantages[4:], torch.zeros(8))  # one reward / no reward: no signal
    assert stats["frac_zero_std_groups"] == pytest.approx(2 / 3)
    assert stats["frac_reward_none"] == pytest.approx(8 / 12)


def test_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 0.0, 4.0, 2.0])
    centered = torch.tensor([0.5, -0.5, 1.0, -1.0])
    batch_adv, stats = group_advantages(rewards, num_generations=2, scale_rewards="batch")
    batch_std = rewards.std()  # unbiased, over the whole batch
    torch.testing.assert_close(batch_adv, centered / (batch_std + 1e-4))
    assert stats["reward_std"] == pytest.approx(batch_std.item())
    none_adv, _ = group_advantages(rewards, num_generations=2, scale_rewards="none")
    torch.testing.assert_close(none_adv, centered)


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), num_generations=2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), num_generations=2, scale_rewards="std")
