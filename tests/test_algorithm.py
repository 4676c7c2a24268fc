"""Algorithm core: hand-computed values for every function, and the laws the update must obey."""

from __future__ import annotations

import math
import os
import textwrap
import time

import pytest
import torch

from dapo_rl.algorithm import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    Aggregation,
    ClipRange,
    DynamicSampler,
    DynamicSamplingExhausted,
    LossSettings,
    aggregate_loss,
    broadcast_to_tokens,
    cispo_loss,
    clip_cov_loss,
    decoupled_clip_loss,
    dppo_kl_loss,
    dppo_tv_loss,
    drgrpo_advantages,
    geo_mean_loss,
    grpo_advantages,
    gspo_loss,
    informative_groups,
    is_batch_coupled,
    kl_cov_loss,
    loss_normalizer,
    Registry,
    overlong_filter_mask,
    sapo_loss,
    soft_overlong_penalty,
    token_entropy,
    token_logprobs,
)
from dapo_rl.algorithm.entropy_losses import token_covariance

# ----------------------------------------------------------------------------- advantages


def test_grpo_advantages_hand_values():
    rewards = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    adv = grpo_advantages(rewards, eps=0.0)
    # group 0: mean 0, unbiased std sqrt(4/3) -> ±sqrt(3)/2
    half_sqrt3 = math.sqrt(3) / 2
    assert torch.allclose(adv[0], torch.tensor([half_sqrt3, -half_sqrt3, half_sqrt3, -half_sqrt3], dtype=torch.float64))
    # group 1: mean 0.5, deviations (.5,.5,.5,-1.5), unbiased var (3*.25+2.25)/3 = 1
    assert torch.allclose(adv[1], torch.tensor([0.5, 0.5, 0.5, -1.5], dtype=torch.float64))


def test_grpo_eps_and_drgrpo_hand_values():
    rewards = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(grpo_advantages(rewards, eps=0.0), torch.tensor([[1 / math.sqrt(2), -1 / math.sqrt(2)]], dtype=torch.float64))
    assert torch.allclose(grpo_advantages(rewards, eps=1.0), torch.tensor([[1 / (math.sqrt(2) + 1), -1 / (math.sqrt(2) + 1)]], dtype=torch.float64))
    assert torch.equal(drgrpo_advantages(rewards), torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert ADVANTAGE_ESTIMATORS.get("drgrpo") is drgrpo_advantages and ADVANTAGE_ESTIMATORS.get("grpo") is grpo_advantages


@pytest.mark.parametrize("value", [0.1, 1.0, -1.0, 0.0, 1e-8])
@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_zero_spread_group_gives_exact_zero(value, estimator):
    rewards = torch.tensor([[value] * 3, [1.0, 0.0, 0.0]])
    adv = ADVANTAGE_ESTIMATORS.get(estimator)(rewards, eps=1e-6)
    assert torch.equal(adv[0], torch.zeros(3))
    assert not torch.isnan(adv).any()
    assert adv[1, 0] > 0 > adv[1, 1]


def test_advantages_reject_bad_shapes():
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="num_groups"):
        grpo_advantages(torch.ones(3))


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(broadcast_to_tokens(adv, mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- overlong


def test_soft_overlong_penalty_hand_values():
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    penalty = soft_overlong_penalty(lengths, max_length=20, cache_length=4)
    assert torch.allclose(penalty, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))


@pytest.mark.parametrize("cache", [0, 20, 25, -1])
def test_soft_overlong_penalty_rejects_bad_cache(cache):
    with pytest.raises(ValueError, match="cache_length"):
        soft_overlong_penalty(torch.tensor([1]), max_length=20, cache_length=cache)


def test_overlong_filter_mask():
    mask = torch.ones(3, 4)
    out = overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert torch.equal(out, torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]))
    # Filtered rows vanish from the token-mean normaliser and from the sequence count.
    assert loss_normalizer(out, "token-mean") == 8
    assert loss_normalizer(out, "seq-mean-token-mean") == 2


# ----------------------------------------------------------------------------- policy loss


def _clip_case(advantage: float, ratio: float, **kwargs):
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(ratio), dtype=torch.float64, requires_grad=True)
    out = decoupled_clip_loss(logp, old, torch.full((1, 1), advantage, dtype=torch.float64), torch.ones(1, 1), ClipRange(**kwargs))
    out.per_token_loss.sum().backward()
    return out, logp.grad.item()


@pytest.mark.parametrize(
    "advantage,ratio,loss,grad,low,high",
    [
        (1.0, 1.5, -1.28, 0.0, False, True),  # clipped above 1+eps_high: no gradient
        (1.0, 1.2, -1.2, -1.2, False, False),  # inside [0.8, 1.28]: d(-A r)/dlogp = -A r
        (1.0, 0.5, -0.5, -0.5, False, False),  # positive advantage, ratio low: min keeps r, gradient flows
        (-1.0, 0.5, 0.8, 0.0, True, False),  # clipped below 1-eps_low: no gradient
        (-1.0, 1.5, 1.5, 1.5, False, False),  # negative advantage, ratio high: unclipped
        (0.0, 3.0, 0.0, 0.0, False, False),
    ],
)
def test_decoupled_clip_hand_values(advantage, ratio, loss, grad, low, high):
    out, g = _clip_case(advantage, ratio, eps_low=0.2, eps_high=0.28)
    assert out.per_token_loss.item() == pytest.approx(loss)
    assert g == pytest.approx(grad)
    assert out.metrics["clip_low"].item() is low and out.metrics["clip_high"].item() is high
    assert out.metrics["clip_frac_low"].item() == low and out.metrics["clip_frac_high"].item() == high


def test_symmetric_clip_is_grpo():
    out, g = _clip_case(1.0, 1.25, eps_low=0.2, eps_high=0.2)
    assert out.per_token_loss.item() == pytest.approx(-1.2) and g == 0.0 and out.metrics["clip_high"].item()


def test_dual_clip_bounds_negative_advantages():
    out, g = _clip_case(-2.0, 4.0, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    assert out.per_token_loss.item() == pytest.approx(6.0)  # min(max(8, 2.56), 6)
    assert g == 0.0 and out.metrics["dual_clip_frac"].item() == 1
    out, g = _clip_case(-2.0, 2.0, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    assert out.per_token_loss.item() == pytest.approx(4.0) and out.metrics["dual_clip_frac"].item() == 0
    out, _ = _clip_case(2.0, 4.0, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)  # positive advantages untouched
    assert out.per_token_loss.item() == pytest.approx(-2.56)
    with pytest.raises(ValueError, match="dual_clip_c"):
        _clip_case(-1.0, 1.0, dual_clip_c=1.0)


def test_clip_statistics_ignore_padding_and_count_sides():
    ratios = torch.tensor([[1.5, 0.5, 1.0, 9.0], [0.5, 1.5, 1.0, 9.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    sums = decoupled_clip_loss(ratios.log(), torch.zeros_like(ratios), adv, mask).metrics
    assert sums["clip_frac_high"].item() == 1  # token (0,0); the padded 9.0 is ignored
    assert sums["clip_frac_low"].item() == 1  # token (1,0)
    assert sums["ratio_mean"].item() == pytest.approx(6.0)
    expected_kl = sum((r - 1) - math.log(r) for r in [1.5, 0.5, 1.0] * 2)
    assert sums["approx_kl"].item() == pytest.approx(expected_kl)
    assert decoupled_clip_loss(ratios.log(), torch.zeros_like(ratios), adv, mask).per_token_loss[:, 3].abs().sum() == 0


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_padding_with_extreme_logprobs_does_not_overflow(name):
    logp = torch.tensor([[0.0, 500.0]], requires_grad=True)
    out = POLICY_LOSSES.get(name)(logp, torch.tensor([[0.0, -500.0]]), torch.ones(1, 2), torch.tensor([[1, 0]]), ClipRange())
    aggregate_loss(out.per_token_loss, torch.tensor([[1, 0]]), "token-mean").backward()
    assert torch.isfinite(logp.grad).all() and out.per_token_loss[0, 1] == 0


def test_gspo_hand_values():
    """Two responses: token ratios (2, 1/2) → sequence ratio 1 (inside the clip), and (e^0.3, e^0.1)
    → s = e^0.2 ≈ 1.2214 (above 1 + 0.1 for A > 0: clipped, no gradient)."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[math.log(2), -math.log(2), 7.0], [0.3, 0.1, 7.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[-1.0, -1.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    out = gspo_loss(logp, old, adv, mask, ClipRange(eps_low=0.1, eps_high=0.1))
    expected = torch.tensor([[1.0, 1.0, 0.0], [-2.2, -2.2, 0.0]], dtype=torch.float64)  # -A·s, -A·clip(s)
    torch.testing.assert_close(out.per_token_loss, expected)
    out.per_token_loss.sum().backward()
    # Sequence 0: d(-A·s_it)/dlogp_t = -A·s_i = 1 on its tokens; sequence 1 clipped: 0; padding: 0.
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert out.metrics["clip_frac_high"].item() == 2 and out.metrics["clip_frac_low"].item() == 0
    assert out.metrics["ratio_mean"].item() == pytest.approx(2 + 2 * math.exp(0.2))


def test_cispo_hand_values():
    """Weights clip(r, 0.8, 1.28), detached; every token keeps a gradient ``-w·A``."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratios = torch.tensor([[2.0, 0.5, 1.1, 3.0]], dtype=torch.float64)
    logp = ratios.log().clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = cispo_loss(logp, old, adv, mask, ClipRange(eps_low=0.2, eps_high=0.28))
    weights = torch.tensor([[1.28, 0.8, 1.1, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out.per_token_loss, -weights * adv * ratios.log() * mask)
    out.per_token_loss.sum().backward()
    torch.testing.assert_close(logp.grad, -weights * adv)  # no token's gradient is dropped
    assert out.metrics["clip_frac_high"].item() == 1 and out.metrics["clip_frac_low"].item() == 1
    assert out.metrics["clip_high"].tolist() == [[True, False, False, False]]


def test_geo_mean_hand_values():
    """GMPO: log-ratios clipped per token in log space by the advantage's sign, then the geometric
    mean per response. Response 0 (A = 1): log r = (0.3, -0.1) → c = (0.2 [capped], -0.1), s = e^0.05.
    Response 1 (A = -2): log r = (-0.5, 0.1) → c = (-0.2 [floored], 0.1), s = e^-0.05."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[0.3, -0.1, 9.0], [-0.5, 0.1, -9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[1.0, 1.0, 5.0], [-2.0, -2.0, 5.0]], dtype=torch.float64)
    out = geo_mean_loss(logp, old, adv, mask, ClipRange(eps_low=0.2, eps_high=0.2))
    s0, s1 = math.exp(0.05), math.exp(-0.05)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-s0, -s0, 0.0], [2 * s1, 2 * s1, 0.0]], dtype=torch.float64))
    loss = aggregate_loss(out.per_token_loss, mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((-s0 + 2 * s1) / 2)  # GMPO's objective: the mean of -Â_i·s_i
    loss.backward()
    # d/dlogp_t of (1/2)·(-Â_i·exp(mean_t c_t)) = -Â_i·s_i/(2·2) on an unclipped token, 0 on a clipped one.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -s0 / 4, 0.0], [0.0, 2 * s1 / 4, 0.0]], dtype=torch.float64))
    assert out.metrics["clip_frac_high"].item() == 1 and out.metrics["clip_frac_low"].item() == 1
    assert out.metrics["clip_high"].tolist() == [[True, False, False], [False, False, False]]


def test_sapo_hand_values():
    """SAPO: -A·σ(τ(r-1))·4/τ; the gradient w.r.t. log π is -A·4σ(1-σ)·r, 1·(-A) at r = 1."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ratios = torch.tensor([[2.0, 0.5, 1.0, 7.0]], dtype=torch.float64)
    logp = ratios.log().clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 3.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = sapo_loss(logp, torch.zeros_like(logp), adv, mask, LossSettings(tau_pos=1.0, tau_neg=1.05))
    x = 1.05 * (0.5 - 1)
    expected = [-4 * sig(1.0), 4 / 1.05 * sig(x), -3 * 2.0, 0.0]  # τ_pos for A > 0, τ_neg for A < 0
    torch.testing.assert_close(out.per_token_loss, torch.tensor([expected], dtype=torch.float64))
    out.per_token_loss.sum().backward()
    grads = [-4 * sig(1.0) * (1 - sig(1.0)) * 2.0, 4 * sig(x) * (1 - sig(x)) * 0.5, -3.0, 0.0]
    torch.testing.assert_close(logp.grad, torch.tensor([grads], dtype=torch.float64))
    assert "clip_frac_low" not in out.metrics and out.metrics["ratio_mean"].item() == pytest.approx(3.5)


def _dppo_case(loss_fn, probs, old_probs, adv, **clip):
    logp = torch.tensor([probs], dtype=torch.float64).log().requires_grad_(True)
    old = torch.tensor([old_probs], dtype=torch.float64).log()
    out = loss_fn(logp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, len(probs)), ClipRange(**clip))
    out.per_token_loss.sum().backward()
    return out, logp.grad[0].tolist()


def test_dppo_tv_hand_values():
    """A token leaves the update when p − p_old passes ε_high (A > 0) or −ε_low (A < 0); the others
    get -min(r, c)·A·log π with r detached."""
    out, grad = _dppo_case(dppo_tv_loss, [0.8, 0.6, 0.2, 0.9, 0.05], [0.5, 0.5, 0.5, 0.5, 0.01], [1, 1, -1, -1, 1],
                           eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    # +0.3 > 0.28 masked; +0.1 kept (r = 1.2); −0.3 < −0.2 masked; +0.4 against a negative push kept
    # (r = 1.8); +0.04 kept, r = 5 truncated at c = 3.
    expected = [0.0, -1.2 * math.log(0.6), 0.0, 1.8 * math.log(0.9), -3.0 * math.log(0.05)]
    assert out.per_token_loss[0].tolist() == pytest.approx(expected)
    assert grad == pytest.approx([0.0, -1.2, 0.0, 1.8, -3.0])
    assert out.metrics["clip_frac_high"].item() == 1 and out.metrics["clip_frac_low"].item() == 1
    assert out.metrics["weight_truncated_frac"].item() == 1
    assert out.metrics["clip_high"].tolist() == [[True, False, False, False, False]]


def test_dppo_kl_hand_values():
    """The binary KL of p_old = 0.5 → p = 0.8 is ½·log(0.5/0.8) + ½·log(0.5/0.2) = ½·log 1.5625 ≈ 0.223
    (kept under ε_high = 0.28, where TV's 0.3 was masked); → 0.9 it is ½·log(25/9) ≈ 0.511 (masked);
    → 0.2 it is 0.223 again, past ε_low = 0.2 for a negative advantage (masked)."""
    out, grad = _dppo_case(dppo_kl_loss, [0.8, 0.9, 0.2, 0.9], [0.5, 0.5, 0.5, 0.5], [1, 1, -1, -1],
                           eps_low=0.2, eps_high=0.28)
    assert out.per_token_loss[0].tolist() == pytest.approx([-1.6 * math.log(0.8), 0.0, 0.0, 1.8 * math.log(0.9)])
    assert grad == pytest.approx([-1.6, 0.0, 0.0, 1.8])  # the last moved against its push: kept
    assert out.metrics["clip_frac_high"].item() == 1 and out.metrics["clip_frac_low"].item() == 1
    assert out.metrics["weight_truncated_frac"].item() == 0  # dual_clip_c null: c = 20


# Two responses of two tokens: mean A = 0, mean log π = -1.5, so the covariances are
# A·(log π + 1.5) = [[1.0, -1.0], [-0.5, 0.5]].
_COV_ADV = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
_COV_LOGP = torch.tensor([[-0.5, -2.5], [-1.0, -2.0]], dtype=torch.float64)


def test_token_covariance_hand_values():
    cov = token_covariance(_COV_ADV, _COV_LOGP, torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(cov, torch.tensor([[1.0, -1.0], [-0.5, 0.5]], dtype=torch.float64))
    # Padding takes no part in the means and is -inf.
    padded = token_covariance(torch.cat([_COV_ADV, torch.full((2, 1), 9.0, dtype=torch.float64)], 1),
                              torch.cat([_COV_LOGP, torch.full((2, 1), 9.0, dtype=torch.float64)], 1),
                              torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    torch.testing.assert_close(padded[:, :2], cov)
    assert padded[:, 2].tolist() == [float("-inf")] * 2


def _cov_case(loss_fn, old, **settings):
    logp = _COV_LOGP.clone().requires_grad_(True)
    out = loss_fn(logp, old, _COV_ADV, torch.ones(2, 2), LossSettings(eps_low=0.2, eps_high=0.28, **settings))
    out.per_token_loss.sum().backward()
    return out, logp.grad


def test_clip_cov_hand_values():
    """Candidates: covariance in (0.4, 5) and not clipped by PPO: tokens (0,0) (cov 1.0) and (1,1)
    (cov 0.5). A budget of ⌊0.5·4⌋ = 2 drops both; the others are -A·r with r = 1."""
    out, grad = _cov_case(clip_cov_loss, _COV_LOGP, clip_cov_ratio=0.5, clip_cov_lb=0.4, generator=torch.Generator().manual_seed(0))
    assert out.metrics["cov_clip"].tolist() == [[True, False], [False, True]]
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64))
    # Token (0,0) clipped by PPO (r = e^0.5 > 1.28, A > 0) is no candidate: only (1,1) is dropped.
    old = _COV_LOGP - torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out, grad = _cov_case(clip_cov_loss, old, clip_cov_ratio=0.5, clip_cov_lb=0.4, generator=torch.Generator().manual_seed(0))
    assert out.metrics["cov_clip"].tolist() == [[False, False], [False, True]]
    assert out.per_token_loss[0, 0].item() == pytest.approx(-1.28) and grad[0, 0] == 0
    assert out.metrics["clip_frac_high"].item() == 1 and out.metrics["cov_clip_frac"].item() == 1


def test_clip_cov_draws_from_the_generator():
    """A budget of one token among two candidates: the generator decides which; the same seed
    draws the same token, and both are drawn by some seed."""
    drawn = []
    for seed in range(12):
        out, _ = _cov_case(clip_cov_loss, _COV_LOGP, clip_cov_ratio=0.25, clip_cov_lb=0.4, generator=torch.Generator().manual_seed(seed))
        again, _ = _cov_case(clip_cov_loss, _COV_LOGP, clip_cov_ratio=0.25, clip_cov_lb=0.4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out.metrics["cov_clip"], again.metrics["cov_clip"]) and out.metrics["cov_clip"].sum() == 1
        drawn.append(tuple(out.metrics["cov_clip"].nonzero()[0].tolist()))
    assert set(drawn) == {(0, 0), (1, 1)}


def test_kl_cov_hand_values():
    """The ⌊0.25·4⌋ = 1 token of largest covariance, (0,0), gets ppo_kl_coef·|log r| on top of the
    unclipped -A·r: with log r = 0.2, -e^0.2 + 0.5·0.2, gradient -e^0.2 + 0.5."""
    old = _COV_LOGP - torch.tensor([[0.2, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out, grad = _cov_case(kl_cov_loss, old, kl_cov_ratio=0.25, ppo_kl_coef=0.5)
    assert out.metrics["kl_cov"].tolist() == [[True, False], [False, False]]
    e = math.exp(0.2)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-e + 0.1, -1.0], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[-e + 0.5, -1.0], [1.0, 1.0]], dtype=torch.float64))
    # A budget of 2 adds the next largest, (1,1), whose |log r| is 0: its loss and gradient are unchanged.
    out, grad = _cov_case(kl_cov_loss, old, kl_cov_ratio=0.5, ppo_kl_coef=0.5)
    assert out.metrics["kl_cov"].tolist() == [[True, False], [False, True]] and grad[1, 1] == 1.0
    assert out.metrics["abs_log_ratio"].item() == pytest.approx(0.2)


@pytest.mark.parametrize("field,value,fix", [("clip_cov_ratio", 0.0, "2e-4"), ("kl_cov_ratio", 1.5, "2e-4"),
                                             ("clip_cov_ub", 0.5, "lb=1"), ("ppo_kl_coef", -1.0, "0.1"),
                                             ("tau_neg", 0.0, "1.05")])
def test_loss_settings_refuse_bad_values_in_one_line(field, value, fix):
    with pytest.raises(ValueError) as err:
        LossSettings(**{field: value})
    message = str(err.value)
    assert message.startswith(f"{field}: ") and fix in message and "\n" not in message
    with pytest.raises(ValueError, match="^eps_low: "):  # the clip's own checks still run
        LossSettings(eps_low=1.0)


def test_new_losses_accept_a_plain_clip_range():
    """A ClipRange (what a loss written before LossSettings was given) works: the defaults fill in."""
    logp, old = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.1, -1.9]])
    for name in POLICY_LOSSES.names():
        a = POLICY_LOSSES.get(name)(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), ClipRange(0.2, 0.28))
        b = POLICY_LOSSES.get(name)(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), LossSettings(0.2, 0.28))
        assert torch.equal(a.per_token_loss, b.per_token_loss), name


def test_registries_refuse_unknown_names_with_the_choices():
    for registry, names in ((POLICY_LOSSES, ["decoupled_clip", "gspo", "cispo"]), (ADVANTAGE_ESTIMATORS, ["grpo", "drgrpo"]),
                            (KL_ESTIMATORS, ["k1", "k2", "k3"]), (LOSS_AGG_MODES, ["token-mean", "seq-mean-token-mean"])):
        assert set(names) <= set(registry.names())
        with pytest.raises(ValueError) as info:
            registry.get("nope")
        assert all(name in str(info.value) for name in names)


def test_registry_imports_a_users_function_by_path():
    assert POLICY_LOSSES.get("dapo_rl.algorithm.policy_loss:cispo_loss") is cispo_loss
    assert "dapo_rl.algorithm.policy_loss:cispo_loss" in POLICY_LOSSES
    with pytest.raises(ValueError, match="cannot import"):
        POLICY_LOSSES.get("no_such_module_xyz:loss")
    with pytest.raises(ValueError, match="not a function"):
        POLICY_LOSSES.get("dapo_rl.algorithm.policy_loss:__doc__")


def _noop_a():
    return "a"


def _noop_b():
    return "b"


def test_registry_duplicates_names_and_classes():
    widgets = Registry("widget")
    widgets.register("a", _noop_a)
    widgets.register("a", _noop_a)  # the same object again: a no-op (a module imported twice)
    with pytest.raises(ValueError, match="widget 'a' is already registered; pass overwrite=True"):
        widgets.register("a", _noop_b)
    with pytest.raises(ValueError, match="already registered"):
        widgets.register("a")(_noop_b)
    assert widgets.get("a") is _noop_a
    widgets.register("a", _noop_b, overwrite=True)
    assert widgets.get("a") is _noop_b
    assert widgets.register("cls")(Aggregation) is Aggregation and widgets.get("cls") is Aggregation
    assert widgets.get("dapo_rl.algorithm:Registry") is Registry  # a class by import path
    for bad in ("", " a", "pkg:a"):
        with pytest.raises(ValueError, match="invalid widget name"):
            widgets.register(bad, _noop_a)
    with pytest.raises(ValueError) as info:
        widgets.get("my.module.fn")
    assert str(info.value) == ("unknown widget 'my.module.fn'; choose one of a, cls or an import path package.module:function "
                               "(did you mean the import path 'my.module:fn'?)")
    assert widgets.names() == ["a", "cls"] and list(widgets) == ["a", "cls"] and len(widgets) == 2


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's module, outside this library, with aggregation modes and a KL estimator."""
    name = f"user_algorithm_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from dapo_rl.algorithm import Aggregation

            def summed(per_token_loss, weights, norm_constant):
                return (per_token_loss * weights).sum()

            TOKEN_SUM = Aggregation(summed, counts="tokens")  # token-mean under another name
            SEQUENCE_SUM = Aggregation(summed, counts="sequences")  # seq-mean-token-sum

            class Estimators:
                @staticmethod
                def half_k1(logp, ref_logp):
                    return 0.5 * (logp - ref_logp)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# ----------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # third row fully filtered out


@pytest.mark.parametrize(
    "mode,expected",
    [("token-mean", 10 / 4), ("seq-mean-token-mean", (2 + 4) / 2), ("seq-mean-token-sum", 10 / 2), ("seq-mean-token-sum-norm", (6 / 4 + 4 / 4) / 2)],
)
def test_aggregation_hand_values(mode, expected):
    assert aggregate_loss(PER_TOKEN, MASK, mode, norm_constant=4).item() == pytest.approx(expected)


def test_aggregation_errors_and_empty_batch():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(PER_TOKEN, MASK, "sum")
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm")
    x = torch.ones(2, 2, requires_grad=True)
    loss = aggregate_loss(x, torch.zeros(2, 2), "token-mean")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(2, 2))


def test_aggregation_mode_by_import_path(user_module):
    for mode, builtin in ((f"{user_module}:TOKEN_SUM", "token-mean"), (f"{user_module}:SEQUENCE_SUM", "seq-mean-token-sum")):
        assert loss_normalizer(MASK, mode).item() == loss_normalizer(MASK, builtin).item()
        assert aggregate_loss(PER_TOKEN, MASK, mode).item() == pytest.approx(aggregate_loss(PER_TOKEN, MASK, builtin).item())
        assert mode in LOSS_AGG_MODES and mode not in LOSS_AGG_MODES.names()


def test_aggregation_by_import_path_must_say_what_it_counts(user_module):
    with pytest.raises(ValueError, match=f"'{user_module}:summed' is a function, not an Aggregation"):
        aggregate_loss(PER_TOKEN, MASK, f"{user_module}:summed")
    with pytest.raises(ValueError, match="counts must be one of tokens, sequences"):
        Aggregation(lambda loss, weights, constant: loss.sum(), counts="rows")
    with pytest.raises(ValueError, match="numerator must be a function"):
        Aggregation(3, counts="tokens")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- laws of the update


class TinyPolicy(torch.nn.Module):
    """A linear softmax policy over fixed per-position features: enough to carry real gradients."""

    def __init__(self, dim: int = 6, vocab: int = 11):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=torch.float64))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return token_logprobs(features @ self.weight.T, tokens, temperature=0.7, chunk_size=5)


def _make_batch(batch: int = 16, length: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, 6, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 11, (batch, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    mask[3] = 0  # an overlong-filtered sample
    advantages = broadcast_to_tokens(torch.randn(batch, generator=gen, dtype=torch.float64), mask)
    return features, tokens, mask, advantages


def _old_logprobs(policy, features, tokens, seed: int = 2):
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        # Perturb so that ratios leave the clip range on both sides.
        return policy(features, tokens) + 0.4 * torch.randn(tokens.shape, generator=gen, dtype=torch.float64)


def _law_settings() -> LossSettings:
    """Narrow enough that every loss clips or masks some tokens (or sequences) of the perturbed
    batch; Clip-Cov and KL-Cov act on a tenth of the tokens (verl's default 2e-4 would touch one).
    A fresh generator each call: two computations of one step draw the same Clip-Cov tokens."""
    return LossSettings(eps_low=0.1, eps_high=0.15, dual_clip_c=3.0, clip_cov_ratio=0.1, clip_cov_lb=0.05,
                        kl_cov_ratio=0.1, ppo_kl_coef=1.0, generator=torch.Generator().manual_seed(0))


LOSSES_AND_MODES = [(loss, mode) for loss in POLICY_LOSSES.names() for mode in LOSS_AGG_MODES.names()]
COUPLED = [name for name in POLICY_LOSSES.names() if is_batch_coupled(POLICY_LOSSES.get(name))]


def _step_gradient(policy, features, tokens, mask, advantages, old_logp, mode, micro_batches: int, loss: str = "decoupled_clip"):
    """Gradient of one optimiser step processed as ``micro_batches`` accumulated micro-batches."""
    policy.zero_grad()
    normalizer = loss_normalizer(mask, mode)  # one count for the whole mini-batch
    settings = _law_settings()
    for idx in torch.arange(features.shape[0]).chunk(micro_batches):
        logp = policy(features[idx], tokens[idx])
        out = POLICY_LOSSES.get(loss)(logp, old_logp[idx], advantages[idx], mask[idx], settings)
        aggregate_loss(out.per_token_loss, mask[idx], mode, normalizer=normalizer, norm_constant=7).backward()
    return policy.weight.grad.clone()


def _skip_if_coupled(loss: str, law: str) -> None:
    if loss in COUPLED:
        pytest.skip(f"{loss} chooses tokens from the statistics of each call, as verl does per micro-batch: the {law} law "
                    "holds only within one call (test_batch_coupled_losses_choose_within_the_call)")


@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
def test_every_loss_clips_in_the_law_batch(loss):
    """The laws below would be weak if nothing were clipped: the batch exercises both sides."""
    policy = TinyPolicy()
    features, tokens, mask, adv = _make_batch()
    old = _old_logprobs(policy, features, tokens)
    logp = policy(features, tokens)
    out = POLICY_LOSSES.get(loss)(logp, old, adv, mask, _law_settings())
    if "clip_frac_low" in out.metrics:
        assert out.metrics["clip_frac_low"] > 0 and out.metrics["clip_frac_high"] > 0
    else:  # no hard clip (sapo, kl_cov): the ratios still leave the clip range on both sides
        ratio = (logp - old).exp()[mask.bool()]
        assert (ratio < 0.9).any() and (ratio > 1.15).any()
    for chosen in ("cov_clip", "kl_cov"):  # the covariance methods act on several tokens
        if chosen in out.metrics:
            assert 1 < out.metrics[chosen].sum() < mask.sum() / 2
    assert out.per_token_loss[mask == 0].abs().sum() == 0
    assert not set(out.metrics) & TRAINER_METRICS


# Names the trainer logs as train/<name> itself: a loss metric of the same name would overwrite one.
TRAINER_METRICS = {"accuracy", "advantage_zero_frac", "batch_groups", "entropy", "generation_rounds", "grad_norm",
                   "informative_group_frac", "kl", "loss", "lr", "response_length_max", "response_length_mean",
                   "reward_failures", "reward_mean", "samples_generated", "samples_generated_total", "sampling_exhausted",
                   "sampling_exhausted_total", "skipped_updates", "truncated_frac", "updates"}


@pytest.mark.parametrize("loss,mode", LOSSES_AND_MODES)
@pytest.mark.parametrize("micro_batches", [2, 4, 8])
def test_gradient_invariant_to_micro_batching(loss, mode, micro_batches):
    _skip_if_coupled(loss, "micro-batch")
    policy = TinyPolicy()
    features, tokens, mask, adv = _make_batch()
    old = _old_logprobs(policy, features, tokens)
    whole = _step_gradient(policy, features, tokens, mask, adv, old, mode, 1, loss)
    split = _step_gradient(policy, features, tokens, mask, adv, old, mode, micro_batches, loss)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("loss,mode", LOSSES_AND_MODES)
def test_gradient_invariant_to_right_padding(loss, mode):
    policy = TinyPolicy()
    features, tokens, mask, adv = _make_batch()
    old = _old_logprobs(policy, features, tokens)
    whole = _step_gradient(policy, features, tokens, mask, adv, old, mode, 1, loss)
    pad = 5
    gen = torch.Generator().manual_seed(9)
    padded = (
        torch.cat([features, torch.randn(16, pad, 6, generator=gen, dtype=torch.float64)], 1),
        torch.cat([tokens, torch.randint(0, 11, (16, pad), generator=gen)], 1),
        torch.cat([mask, torch.zeros(16, pad, dtype=torch.float64)], 1),
        torch.cat([adv, torch.randn(16, pad, generator=gen, dtype=torch.float64)], 1),  # garbage under the mask
        torch.cat([old, torch.randn(16, pad, generator=gen, dtype=torch.float64) * 50], 1),
    )
    f, t, m, a, o = padded
    micro_batches = 1 if loss in COUPLED else 4  # a coupled loss is padding-invariant within one call
    torch.testing.assert_close(_step_gradient(policy, f, t, m, a, o, mode, micro_batches, loss), whole, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("loss,mode", LOSSES_AND_MODES)
def test_gradient_invariant_to_sample_order(loss, mode):
    _skip_if_coupled(loss, "order")
    policy = TinyPolicy()
    features, tokens, mask, adv = _make_batch()
    old = _old_logprobs(policy, features, tokens)
    whole = _step_gradient(policy, features, tokens, mask, adv, old, mode, 1, loss)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    shuffled = _step_gradient(policy, features[perm], tokens[perm], mask[perm], adv[perm], old[perm], mode, 4, loss)
    torch.testing.assert_close(shuffled, whole, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("loss,mode", LOSSES_AND_MODES)
def test_on_policy_gradient_equals_reinforce(loss, mode):
    """At π_θ = π_old every registered loss is the policy gradient ``-A·∇log π`` (ratio 1, no clip);
    Clip-Cov's is that of the tokens it did not draw (they still count in the normaliser)."""
    policy = TinyPolicy()
    features, tokens, mask, adv = _make_batch()
    with torch.no_grad():
        old = policy(features, tokens)
    clipped = _step_gradient(policy, features, tokens, mask, adv, old, mode, 1, loss)
    kept = ~POLICY_LOSSES.get(loss)(old, old, adv, mask, _law_settings()).metrics.get("cov_clip", torch.zeros_like(mask, dtype=torch.bool))
    if loss == "clip_cov":
        assert (~kept).sum() > 0  # on-policy nothing is clipped, yet tokens are drawn
    policy.zero_grad()
    reinforce = aggregate_loss(-adv * policy(features, tokens) * kept, mask, mode, norm_constant=7)
    reinforce.backward()
    torch.testing.assert_close(clipped, policy.weight.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", COUPLED)
def test_batch_coupled_losses_choose_within_the_call(loss):
    """Clip-Cov and KL-Cov choose tokens from the means and the token count of the batch they are
    given (verl: of each micro-batch). Within one call the choice ignores padding (the padding law
    above) and, for KL-Cov's top-k, the order of the samples; split into micro-batches it changes,
    which is why the micro-batch and order laws do not apply to them."""
    policy = TinyPolicy()
    features, tokens, mask, adv = _make_batch()
    old = _old_logprobs(policy, features, tokens)
    fn = POLICY_LOSSES.get(loss)
    chosen_set = "cov_clip" if loss == "clip_cov" else "kl_cov"
    with torch.no_grad():
        logp = policy(features, tokens)
    whole = fn(logp, old, adv, mask, _law_settings()).metrics[chosen_set]
    settings = _law_settings()
    halves = torch.cat([fn(logp[idx], old[idx], adv[idx], mask[idx], settings).metrics[chosen_set]
                        for idx in torch.arange(16).chunk(2)])
    assert not torch.equal(halves, whole)
    if loss == "kl_cov":
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
        shuffled = fn(logp[perm], old[perm], adv[perm], mask[perm], _law_settings()).metrics[chosen_set]
        assert torch.equal(shuffled, whole[perm])
        torch.testing.assert_close(_step_gradient(policy, features[perm], tokens[perm], mask[perm], adv[perm], old[perm],
                                                  "token-mean", 1, loss),
                                   _step_gradient(policy, features, tokens, mask, adv, old, "token-mean", 1, loss))


def test_normalizer_adds_up_over_micro_batches():
    _, _, mask, _ = _make_batch()
    for mode in LOSS_AGG_MODES.names():
        parts = sum(loss_normalizer(m, mode) for m in mask.chunk(4))
        assert parts == loss_normalizer(mask, mode)
    assert loss_normalizer(mask, "seq-mean-token-mean") == 15  # row 3 filtered out


# ----------------------------------------------------------------------------- dynamic sampling


def test_informative_groups():
    correct = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert informative_groups(correct).tolist() == [True, False, False, True]


def _round(labels: list[list[int]], start: int):
    groups = [f"g{start + i}" for i in range(len(labels))]
    return groups, torch.tensor(labels, dtype=torch.bool)


def test_sampler_fills_batch_and_keeps_surplus():
    sampler = DynamicSampler(groups_per_step=2, max_rounds=5)
    sampler.start_step()
    assert sampler.needs_more()
    assert sampler.add(*_round([[1, 1], [1, 0], [0, 0]], 0)) == 1
    assert sampler.needs_more()
    assert sampler.add(*_round([[0, 1], [1, 0], [0, 1]], 3)) == 3
    assert not sampler.needs_more()
    batch = sampler.take()
    assert batch.groups == ["g1", "g3"]
    assert (batch.rounds, batch.groups_generated, batch.groups_informative, batch.exhausted) == (2, 6, 4, False)
    assert sampler.pooled == 2
    sampler.start_step()
    assert not sampler.needs_more()  # the carried surplus fills the next step without generating
    batch = sampler.take()
    assert batch.groups == ["g4", "g5"] and batch.rounds == 0


def test_sampler_drop_surplus_and_disabled_filter():
    sampler = DynamicSampler(groups_per_step=1, surplus="drop")
    sampler.start_step()
    sampler.add(*_round([[0, 1], [1, 0]], 0))
    assert sampler.take().groups == ["g0"] and sampler.pooled == 0
    plain = DynamicSampler(groups_per_step=2, enabled=False)
    plain.start_step()
    plain.add(*_round([[1, 1], [0, 0]], 0))
    batch = plain.take()
    assert batch.groups == ["g0", "g1"] and batch.groups_informative == 2


def test_sampler_round_limit():
    sampler = DynamicSampler(groups_per_step=2, max_rounds=2, on_exhausted="error")
    sampler.start_step()
    for r in range(2):
        assert sampler.needs_more()
        sampler.add(*_round([[1, 1], [0, 1]], 2 * r))
    batch = sampler.take()  # full after two rounds of one informative group each
    assert len(batch.groups) == 2
    sampler.start_step()
    sampler.add(*_round([[1, 1]], 9))
    sampler.add(*_round([[0, 0]], 10))
    with pytest.raises(DynamicSamplingExhausted, match="dynamic_sampling.max_rounds"):
        sampler.needs_more()
    lenient = DynamicSampler(groups_per_step=2, max_rounds=1)  # on_exhausted="train", the default
    lenient.start_step()
    lenient.add(*_round([[1, 0], [1, 1]], 0))
    assert not lenient.needs_more()
    batch = lenient.take()
    assert batch.groups == ["g0"] and batch.exhausted


def test_sampler_state_round_trip_and_validation():
    sampler = DynamicSampler(groups_per_step=1)
    sampler.start_step()
    sampler.add(*_round([[0, 1], [1, 0]], 0))
    sampler.take()
    restored = DynamicSampler(groups_per_step=1)
    restored.load_state_dict(sampler.state_dict())
    assert restored.pooled == 1
    for bad in [dict(groups_per_step=0), dict(groups_per_step=1, max_rounds=0), dict(groups_per_step=1, surplus="x"), dict(groups_per_step=1, on_exhausted="x")]:
        with pytest.raises(ValueError):
            DynamicSampler(**bad)


# ----------------------------------------------------------------------------- entropy, log-probs, KL


def test_entropy_hand_values_and_chunking():
    uniform = torch.zeros(2, 3, 8)
    assert torch.allclose(token_entropy(uniform, chunk_size=2), torch.full((2, 3), math.log(8)))
    two_point = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert token_entropy(two_point).item() == pytest.approx(expected, rel=1e-6)
    logits = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Categorical(logits=logits / 0.6).entropy()
    for chunk in (1, 4, 7, 100):
        torch.testing.assert_close(token_entropy(logits, temperature=0.6, chunk_size=chunk), ref)


def test_entropy_gradient_through_chunks():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    token_entropy(logits, chunk_size=3).sum().backward()
    chunked = logits.grad.clone()
    logits.grad = None
    torch.distributions.Categorical(logits=logits).entropy().sum().backward()
    torch.testing.assert_close(chunked, logits.grad)


def test_token_logprobs_match_log_softmax_at_temperature():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=gen)
    tokens = torch.randint(0, 13, (2, 6), generator=gen)
    expected = torch.log_softmax(logits / 1.5, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=1.5, chunk_size=5), expected)


@pytest.mark.parametrize("chunk", [None, 1, 4, 100])
def test_token_logprobs_gradient_equals_autograd_of_the_log_softmax(chunk):
    # One autograd node that keeps only the logits: its gradient must be autograd's own.
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 13, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    (token_logprobs(logits, tokens, temperature=0.7, chunk_size=chunk) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens[0], temperature=1.3, chunk_size=chunk), (logits[0].detach().requires_grad_(),))


def test_token_logprobs_of_bfloat16_logits_are_float32_and_the_gradient_bfloat16():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 11, generator=gen).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 11, (6,), generator=gen)
    out = token_logprobs(logits, tokens, chunk_size=4)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(out, expected.detach())
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert token_logprobs(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([0.0]), torch.tensor([math.log(0.5)])
    assert KL_ESTIMATORS.get("k1")(logp, ref).item() == pytest.approx(math.log(2))
    assert KL_ESTIMATORS.get("k2")(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert KL_ESTIMATORS.get("k3")(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert KL_ESTIMATORS.get("k3")(ref, ref).item() == 0.0
    with pytest.raises(ValueError, match="k3"):
        KL_ESTIMATORS.get("k9")


def test_kl_estimator_by_import_path(user_module):
    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -0.25]])
    estimator = KL_ESTIMATORS.get(f"{user_module}:Estimators.half_k1")
    torch.testing.assert_close(estimator(logp, ref), 0.5 * KL_ESTIMATORS.get("k1")(logp, ref))


def test_the_helpers_a_new_loss_is_built_from():
    """``token_log_ratio``, ``masked`` and ``ratio_metrics`` (public, for registered losses), by hand."""
    from dapo_rl.algorithm import masked, ratio_metrics, token_log_ratio

    valid = torch.tensor([[True, True, False]])
    logp = torch.tensor([[math.log(2.0), math.log(0.25), float("inf")]], requires_grad=True)
    old = torch.tensor([[0.0, math.log(0.5), 0.0]])
    log_ratio = token_log_ratio(logp, old, valid)
    assert log_ratio[0].tolist() == pytest.approx([math.log(2.0), math.log(0.5), 0.0])
    ratio = torch.exp(log_ratio)
    metrics = ratio_metrics(ratio.detach(), valid)
    assert metrics["ratio_mean"].item() == pytest.approx(2.5)  # token sums: 2 + 0.5
    assert metrics["approx_kl"].item() == pytest.approx((1 - math.log(2)) + (-0.5 + math.log(2)))  # (r − 1) − log r
    loss = masked(torch.where(valid, -ratio, torch.full_like(ratio, float("nan"))), valid)
    assert loss[0].tolist() == pytest.approx([-2.0, -0.5, 0.0])
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0  # padding gets no gradient, not NaN
