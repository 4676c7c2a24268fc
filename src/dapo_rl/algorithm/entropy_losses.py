"""Clip-Cov and KL-Cov: the covariance-based entropy controls of Cui et al. 2025, "The Entropy
Mechanism of Reinforcement Learning for Reasoning Language Models" (arXiv 2505.22617).

The paper shows that the entropy of the policy moves with the covariance between a token's
log-probability and its advantage: tokens that are both likely and advantaged drive the
collapse. Both methods find, among the tokens of the batch, those of largest centred covariance

    Cov_it = (A_it − mean(A)) · (log π_θ(o_it) − mean(log π_θ)),   means over the batch's loss tokens

and restrain only them (a tiny fraction: verl's default 2e-4 of the tokens), leaving the rest of
the update as it is. Registered as ``loss.policy_loss=clip_cov`` and ``loss.policy_loss=kl_cov``;
hyper-parameters in :class:`~dapo_rl.algorithm.policy_loss.LossSettings` (config section ``loss``).

Both are :func:`~dapo_rl.algorithm.policy_loss.batch_coupled`: the means and the token budget are
those of the batch the loss is given, as in verl, where that batch is one micro-batch. Their
gradient therefore depends on ``micro_batch_size``; within one call they obey the padding law.
"""

from __future__ import annotations

import torch

from dapo_rl.algorithm.policy_loss import (
    POLICY_LOSSES,
    ClipRange,
    LossSettings,
    PolicyLossResult,
    masked,
    ratio_metrics,
    token_log_ratio,
    batch_coupled,
)


def token_covariance(advantages: torch.Tensor, logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The centred product ``(A − mean A)·(log π − mean log π)`` of each token (a summand of the
    batch covariance the paper ties to the entropy change), means over the ``valid`` tokens; ``-inf`` off them, so no selection picks padding.

    Args:
        advantages, logp, valid: ``[batch, response_len]`` (``logp`` is read, not differentiated).
    Returns:
        ``[batch, response_len]`` detached.
    """
    count = valid.sum().clamp_min(1)
    a = advantages.detach()
    lp = torch.where(valid, logp.detach(), torch.zeros_like(logp))
    a_mean = torch.where(valid, a, torch.zeros_like(a)).sum() / count
    lp_mean = lp.sum() / count
    cov = (a - a_mean) * (lp - lp_mean)
    return torch.where(valid, cov, torch.full_like(cov, float("-inf")))


def _draw(candidates: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` of the ``candidates`` (bool ``[batch, response_len]``) drawn uniformly without
    replacement, as a bool mask. Candidates are listed in row-major order and permuted on the CPU,
    so the draw depends only on the generator's state, not on the device."""
    chosen = torch.zeros_like(candidates)
    where = candidates.nonzero()  # [n, 2], row-major
    if len(where) == 0:
        return chosen
    order = torch.randperm(len(where), generator=generator) if generator is not None else torch.randperm(len(where))
    picked = where[order[:count].to(where.device)]
    chosen[picked[:, 0], picked[:, 1]] = True
    return chosen


@POLICY_LOSSES.register("clip_cov")
@batch_coupled
def clip_cov_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  settings: ClipRange = LossSettings()) -> PolicyLossResult:
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617): the decoupled-clip surrogate, with
    the gradient of a few high-covariance tokens removed.

    Candidates are the tokens the PPO clip left alone whose covariance (:func:`token_covariance`)
    lies strictly between ``clip_cov_lb`` and ``clip_cov_ub``; ``max(1, ⌊clip_cov_ratio · N⌋)`` of
    them (N: the batch's loss tokens) are drawn uniformly from ``settings.generator`` and lose
    their loss (value and gradient 0). Everything else is ``-min(r·A, clip(r, 1-ε_low, 1+ε_high)·A)``
    without the dual clip, as in verl. verl: ``policy_loss.loss_mode=clip_cov`` with
    ``policy_loss.clip_cov_ratio/clip_cov_lb/clip_cov_ub`` (our ``loss.clip_cov_*``); TRL: none.
    Equal to verl 0.9.1's ``compute_policy_loss_clip_cov`` given the same random state
    (``tests/test_verl_parity.py``).

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` as :func:`decoupled_clip_loss`,
    ``cov_clip_frac`` (tokens drawn), ``ratio_mean``, ``approx_kl``; token sets ``clip_low``,
    ``clip_high``, ``cov_clip``.
    """
    s = LossSettings.of(settings)
    valid = mask.bool()
    ratio = torch.exp(token_log_ratio(logp, old_logp, valid))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high)
    r = ratio.detach()
    clip_low = valid & (advantages < 0) & (r < 1.0 - s.eps_low)
    clip_high = valid & (advantages > 0) & (r > 1.0 + s.eps_high)
    cov = token_covariance(advantages, logp, valid)
    # Tokens the PPO clip already holds back are not candidates: dropping them would change nothing.
    candidates = valid & ~(clipped.detach() > unclipped.detach()) & (cov > s.clip_cov_lb) & (cov < s.clip_cov_ub)
    drawn = _draw(candidates, max(int(s.clip_cov_ratio * int(valid.sum())), 1), s.generator)
    loss = torch.where(drawn, torch.zeros_like(unclipped), torch.maximum(unclipped, clipped))
    metrics = {"clip_frac_low": clip_low.sum(), "clip_frac_high": clip_high.sum(), "cov_clip_frac": drawn.sum(),
               **ratio_metrics(r, valid), "clip_low": clip_low, "clip_high": clip_high, "cov_clip": drawn}
    return PolicyLossResult(masked(loss, valid), metrics)


@POLICY_LOSSES.register("kl_cov")
@batch_coupled
def kl_cov_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                settings: ClipRange = LossSettings()) -> PolicyLossResult:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617): the unclipped surrogate ``-r·A``,
    plus ``ppo_kl_coef·|log r|`` on the ``max(1, ⌊kl_cov_ratio · N⌋)`` tokens of largest covariance
    (:func:`token_covariance`; N: the batch's loss tokens).

    There is no PPO clip: the KL term on the few tokens that drive the entropy down is the whole
    trust region (the ``clip`` section is not read). On-policy ``|log r| = 0`` with a zero
    gradient, so the update is the policy gradient. verl: ``policy_loss.loss_mode=kl_cov`` with
    ``policy_loss.kl_cov_ratio/ppo_kl_coef`` (our ``loss.kl_cov_ratio/ppo_kl_coef``); TRL: none.
    Equal to verl 0.9.1's ``compute_policy_loss_kl_cov`` (``tests/test_verl_parity.py``).

    Metrics: ``kl_cov_frac`` (tokens penalised), ``abs_log_ratio`` (mean |log r|, verl's
    ``ppo_kl`` of this loss), ``ratio_mean``, ``approx_kl``; token set ``kl_cov``.
    """
    s = LossSettings.of(settings)
    valid = mask.bool()
    log_ratio = token_log_ratio(logp, old_logp, valid)
    ratio = torch.exp(log_ratio)
    cov = token_covariance(advantages, logp, valid)
    selected = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    tokens = int(valid.sum())
    if tokens:  # the budget never exceeds the valid tokens, whose covariance is finite: padding (-inf) is never picked
        selected[torch.topk(cov.reshape(-1), max(1, int(tokens * s.kl_cov_ratio))).indices] = True
    selected = selected.view_as(valid)
    loss = -advantages * ratio + torch.where(selected, s.ppo_kl_coef * log_ratio.abs(), torch.zeros_like(log_ratio))
    metrics = {"kl_cov_frac": selected.sum(), "abs_log_ratio": log_ratio.detach().abs()[valid].sum(),
               **ratio_metrics(ratio.detach(), valid), "kl_cov": selected}
    return PolicyLossResult(masked(loss, valid), metrics)
