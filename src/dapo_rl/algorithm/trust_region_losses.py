"""Policy losses that bound the update otherwise than PPO's hard clip of the token ratio:
GMPO's geometric mean (``geo_mean``), SAPO's soft gate (``sapo``) and DPPO's divergence masks
(``dppo_tv``, ``dppo_kl``). Each is registered in :data:`~dapo_rl.algorithm.policy_loss.POLICY_LOSSES`
with the shared signature; hyper-parameters beyond the clip are in
:class:`~dapo_rl.algorithm.policy_loss.LossSettings`.
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
)

# exp() of a log-ratio beyond this overflows float32 soon after; no sane update gets near it.
_MAX_LOG_RATIO = 20.0


@POLICY_LOSSES.register("geo_mean")
def geo_mean_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  settings: ClipRange = ClipRange(0.4, 0.4)) -> PolicyLossResult:
    """GMPO, Geometric-Mean Policy Optimization (arXiv 2507.20673): maximise
    ``Â_i · Π_t clip(r_it)^(1/|o_i|)``, the geometric mean of the token ratios instead of
    their arithmetic mean, so one extreme token ratio moves the objective far less.

    The clip acts per token in log space, pessimistically by the advantage's sign: for ``A > 0``
    ``log r`` is capped at ``ε_high``, for ``A < 0`` floored at ``-ε_low`` (the paper's (e^-0.4,
    e^0.4): ``clip.eps_low=0.4 clip.eps_high=0.4``; note these ε bound ``log r``, not ``r``). With
    ``c_it`` the clipped log-ratio and ``s_i = exp(mean_t c_it)``, each token carries the value
    ``-Â_i·s_i`` and the gradient ``-Â_i·s_i·∇c_it``, so that ``loss.agg_mode=seq-mean-token-mean``
    is GMPO's objective with its gradient (``token-mean`` weighs each sequence by its length).
    ``Â_i`` is the mean of the response's token advantages (one value per response in GRPO).
    verl: ``policy_loss.loss_mode=geo_mean``; TRL: none.

    Equal to verl 0.9.1's ``compute_policy_loss_geo_mean`` under ``seq-mean-token-mean``, which
    verl always uses (it ignores ``loss_agg_mode``), with two deliberate differences: verl divides
    by every row of the batch, an overlong-filtered (fully masked) one included, where ours counts
    the responses in the loss like every mode; and ``mean_t c_it`` is capped at 20 so exp() cannot
    overflow (verl leaves it open). ``tests/test_verl_parity.py`` checks both.

    Metrics: ``clip_frac_high`` (A > 0, log r > ε_high: no gradient), ``clip_frac_low`` (A < 0,
    log r < -ε_low), ``ratio_mean`` (the sequence ratio s_i, per token), ``approx_kl`` (token
    ratios); token sets ``clip_low`` and ``clip_high``.
    """
    valid = mask.bool()
    log_ratio = token_log_ratio(logp, old_logp, valid)
    clipped = torch.where(advantages > 0, log_ratio.clamp(max=settings.eps_high),
                          torch.where(advantages < 0, log_ratio.clamp(min=-settings.eps_low), torch.zeros_like(log_ratio)))
    lengths = valid.sum(-1, keepdim=True).clamp_min(1)
    seq_log_ratio = (clipped.sum(-1, keepdim=True) / lengths).detach().clamp(max=_MAX_LOG_RATIO)  # [batch, 1] log s_i
    seq_advantage = torch.where(valid, advantages, torch.zeros_like(advantages)).sum(-1, keepdim=True) / lengths
    # Value s_i on every token; gradient s_i · ∇c_it.
    token_ratio = torch.exp(seq_log_ratio + clipped - clipped.detach())
    loss = -seq_advantage * token_ratio
    lr = log_ratio.detach()
    clip_high = valid & (advantages > 0) & (lr > settings.eps_high)
    clip_low = valid & (advantages < 0) & (lr < -settings.eps_low)
    s = token_ratio.detach()
    metrics = {"clip_frac_low": clip_low.sum(), "clip_frac_high": clip_high.sum(), "ratio_mean": s[valid].sum(),
               "approx_kl": ratio_metrics(torch.exp(lr), valid)["approx_kl"], "clip_low": clip_low, "clip_high": clip_high}
    return PolicyLossResult(masked(loss, valid), metrics)


@POLICY_LOSSES.register("sapo")
def sapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              settings: ClipRange = LossSettings()) -> PolicyLossResult:
    """SAPO, Soft Adaptive Policy Optimization (arXiv 2511.20347): ``-f(r)·A`` with the soft gate ``f(r) = σ(τ·(r − 1))·4/τ`` in place of the hard clip.

    ``f(1) = 2/τ`` and ``f'(1) = 1``: on-policy the update is the policy gradient, and a token's
    gradient weight ``f'(r)·r = 4σ(1−σ)·r`` decays smoothly as its ratio leaves 1 instead of
    dropping to 0 at a bound. τ is ``tau_pos`` for ``A > 0`` and ``tau_neg`` otherwise (the paper:
    1.0 and 1.05: negative updates, which raise many unsampled tokens, are damped faster). The
    clip section is not read. The paper aggregates with ``loss.agg_mode=seq-mean-token-mean``.
    verl: ``policy_loss.loss_mode=sapo`` with ``actor.tau_pos/tau_neg``; TRL: ``loss_type="sapo"``
    with ``sapo_temperature_pos/neg``.

    Equal to verl 0.9.1's ``compute_policy_loss_sapo`` (log r clamped to ±20 as there) under
    ``seq-mean-token-mean``, the only mode verl's function uses (it ignores ``loss_agg_mode``);
    ours follows ``loss.agg_mode``.

    Metrics: ``ratio_mean``, ``approx_kl`` (no token is clipped).
    """
    s = LossSettings.of(settings)
    valid = mask.bool()
    ratio = torch.exp(token_log_ratio(logp, old_logp, valid).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    tau = torch.where(advantages > 0, torch.full_like(ratio, s.tau_pos), torch.full_like(ratio, s.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return PolicyLossResult(masked(-gate * advantages, valid), ratio_metrics(ratio.detach(), valid))


def _dppo(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, settings: ClipRange,
          divergence: str) -> PolicyLossResult:
    """DPPO (Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement Learning",
    arXiv 2602.04879; prime-rl's default loss), with the binary approximation (the sampled token
    against all the others) of the divergence ``divergence``: ``"tv"`` or ``"kl"``.

    PPO's ratio clip over-restrains tokens of low probability (a large ratio, a tiny change of the
    distribution) and under-restrains likely ones. DPPO bounds a divergence between π_θ and π_old
    instead: a token whose divergence is past the threshold *and* moved the way its advantage
    pushes leaves the update; the others get ``-sg(min(r, c))·A·log π_θ``, an importance-weighted
    policy gradient whose weight is truncated at ``c`` (the paper's §5.4: truncation, not dual clip).

    The thresholds are the clip section's, as in verl, whose ``clip_ratio_low/high`` are these
    losses' divergence thresholds (prime-rl ``dppo_mask_low/high``): ``clip.eps_high`` for
    ``A > 0``, ``clip.eps_low`` otherwise. ``c`` is ``clip.dual_clip_c`` (verl ``clip_ratio_c``),
    20 when null (verl's fallback value; its ActorConfig default is 3). log r is clamped to ±20 as
    in verl. TRL: none. Equal to verl 0.9.1's functions in every aggregation mode
    (``tests/test_verl_parity.py``).

    Metrics: ``clip_frac_high`` / ``clip_frac_low`` (tokens masked for A > 0 / A < 0),
    ``weight_truncated_frac`` (kept tokens whose weight hit c), ``ratio_mean``, ``approx_kl``; token sets
    ``clip_low`` and ``clip_high``.
    """
    valid = mask.bool()
    log_ratio = token_log_ratio(logp, old_logp, valid)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).detach()
    # The divergences read detached log-probs, 0 (p = 1) off the mask where padding may hold any value.
    lp = torch.where(valid, logp.detach(), torch.zeros_like(logp))
    old_lp = torch.where(valid, old_logp, torch.zeros_like(old_logp))
    p, p_old = lp.exp(), old_lp.exp()
    if divergence == "tv":
        change = p - p_old  # signed binary total variation
        keep_positive, keep_negative = change <= settings.eps_high, change >= -settings.eps_low
    else:
        # KL(Bern(p_old) ‖ Bern(p)); the 1e-8 (as verl) keeps p = 1 finite.
        kl = p_old * (old_lp - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        keep_positive, keep_negative = (kl <= settings.eps_high) | (p <= p_old), (kl <= settings.eps_low) | (p >= p_old)
    keep = torch.where(advantages > 0, keep_positive, keep_negative)
    cap = settings.dual_clip_c if settings.dual_clip_c is not None else 20.0
    loss = torch.where(keep, -ratio.clamp(max=cap) * advantages * torch.where(valid, logp, torch.zeros_like(logp)),
                       torch.zeros_like(logp))
    masked_high = valid & (advantages > 0) & ~keep
    masked_low = valid & (advantages < 0) & ~keep
    metrics = {"clip_frac_low": masked_low.sum(), "clip_frac_high": masked_high.sum(),
               "weight_truncated_frac": (valid & keep & (ratio > cap)).sum(), **ratio_metrics(ratio, valid),
               "clip_low": masked_low, "clip_high": masked_high}
    return PolicyLossResult(masked(loss, valid), metrics)


@POLICY_LOSSES.register("dppo_tv")
def dppo_tv_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 settings: ClipRange = ClipRange()) -> PolicyLossResult:
    """DPPO-Binary-TV (arXiv 2602.04879; see :func:`_dppo`): with p the probability of the sampled
    token, a token is kept when ``p − p_old ≤ ε_high`` (A > 0) or ``p − p_old ≥ −ε_low`` (A ≤ 0).
    verl: ``policy_loss.loss_mode=dppo_tv``; prime-rl's default loss."""
    return _dppo(logp, old_logp, advantages, mask, settings, "tv")


@POLICY_LOSSES.register("dppo_kl")
def dppo_kl_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 settings: ClipRange = ClipRange()) -> PolicyLossResult:
    """DPPO-Binary-KL (arXiv 2602.04879; see :func:`_dppo`): the divergence is
    ``KL(Bern(p_old) ‖ Bern(p)) = p_old·log(p_old/p) + (1−p_old)·log((1−p_old)/(1−p))``; a token
    is masked when it exceeds ``ε_high`` (A > 0) / ``ε_low`` (A ≤ 0) and p moved the way the
    advantage pushes. verl: ``policy_loss.loss_mode=dppo_kl``."""
    return _dppo(logp, old_logp, advantages, mask, settings, "kl")
