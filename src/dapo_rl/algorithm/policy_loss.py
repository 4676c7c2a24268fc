"""Policy-gradient losses, per token, registered by name in :data:`POLICY_LOSSES`.

Every loss has one signature::

    fn(logp, old_logp, advantages, mask, settings: LossSettings) -> PolicyLossResult(per_token_loss, metrics)

``settings`` is a :class:`LossSettings`, which *is* a :class:`ClipRange` (it adds the
hyper-parameters of the losses that have their own, and the run's random generator), so a loss
written against ``clip: ClipRange`` reads ``clip.eps_low`` unchanged.

``logp`` / ``old_logp`` / ``advantages`` / ``mask`` are ``[batch, response_len]``: log-probabilities
(natural log, at the sampling temperature) of the sampled tokens under the current policy π_θ
(differentiable) and the old policy π_old, the per-token advantage, and 1 where a token
contributes to the loss. ``per_token_loss`` is the *negative* objective per token, 0 off the mask;
reduce it with :func:`dapo_rl.algorithm.aggregation.aggregate_loss`.

``metrics`` maps names to tensors, in two kinds the trainer adds up across micro-batches and
ranks without knowing the loss:

- a 0-dim tensor is a **sum over the masked tokens**; the trainer logs ``train/<name>`` as that
  sum divided by the number of trained tokens (a fraction or a mean per token);
- a bool tensor shaped like ``mask`` is a **set of tokens**; the trainer logs the old-policy
  probability of those tokens as ``diag/<name>_old_prob_{mean,p10,p50,p90}`` (the DAPO paper's
  diagnostic of which tokens the clip acts on).

A user's own loss is registered with ``@POLICY_LOSSES.register("name")`` or selected by import path
``loss.policy_loss=package.module:function``. Every registered loss is tested by the same laws
(micro-batch, padding and order invariance, on-policy = policy gradient) in
``tests/test_algorithm.py``; a loss marked :func:`batch_coupled` obeys them within one call only.
Besides the three below, :mod:`~dapo_rl.algorithm.entropy_losses` (``clip_cov``, ``kl_cov``) and
:mod:`~dapo_rl.algorithm.trust_region_losses` (``geo_mean``, ``sapo``, ``dppo_tv``, ``dppo_kl``)
register theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from dapo_rl.algorithm.registry import Registry


@dataclass(frozen=True)
class ClipRange:
    """The clip settings a loss may read (config section ``clip``).

    ``eps_low`` / ``eps_high``: the ratio (or importance weight) is clipped to
    ``[1 - eps_low, 1 + eps_high]``; verl ``clip_ratio_low/high``, TRL ``epsilon/epsilon_high``.
    ``dual_clip_c``: bound ``c > 1`` on the loss of negative-advantage tokens (decoupled_clip
    only); verl ``clip_ratio_c``.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"eps_low: must be in [0, 1), got {self.eps_low}; paper: 0.2")
        if self.eps_high < 0:
            raise ValueError(f"eps_high: must be >= 0, got {self.eps_high}; paper: 0.28")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c: must be > 1, got {self.dual_clip_c}; use e.g. 3.0, or null to disable")


@dataclass(frozen=True)
class LossSettings(ClipRange):
    """Everything a policy loss may read: the clip (the :class:`ClipRange` it extends, config
    section ``clip``), the hyper-parameters of the losses that have their own (config section
    ``loss``, under verl's names and with verl 0.9.1's defaults) and a random generator.

    ``clip_cov_ratio`` / ``clip_cov_lb`` / ``clip_cov_ub``: Clip-Cov draws ``clip_cov_ratio`` of
    the batch's tokens among those whose centred covariance lies in ``(lb, ub)``; verl
    ``policy_loss.clip_cov_ratio`` etc. ``kl_cov_ratio`` / ``ppo_kl_coef``: KL-Cov penalises the
    ``kl_cov_ratio`` tokens of largest covariance by ``ppo_kl_coef·|log r|``; verl
    ``policy_loss.kl_cov_ratio`` / ``policy_loss.ppo_kl_coef``. ``tau_pos`` / ``tau_neg``: SAPO's
    gate temperatures for positive / non-positive advantages; verl ``actor.tau_pos/tau_neg``, TRL
    ``sapo_temperature_pos/neg``.

    ``generator``: where a loss that draws tokens at random (Clip-Cov) draws from. The trainer
    passes one seeded by the run's seed, the update's index and the rank, so a run stays
    bit-reproducible across a resume; None draws from torch's global generator, as verl does.
    """

    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    ppo_kl_coef: float = 0.1
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)

    # The fields configured in the ``loss`` section (the others come from ``clip`` or the run).
    LOSS_FIELDS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "tau_pos", "tau_neg")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name}: must be a fraction of the tokens in (0, 1], got {value}; verl's default is 2e-4")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_ub: must be above clip_cov_lb ({self.clip_cov_lb}), got {self.clip_cov_ub}; "
                             "verl's defaults are lb=1, ub=5")
        if self.ppo_kl_coef < 0:
            raise ValueError(f"ppo_kl_coef: must be >= 0, got {self.ppo_kl_coef}; verl's default is 0.1")
        for name in ("tau_pos", "tau_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}; the SAPO paper uses tau_pos=1, tau_neg=1.05")

    @classmethod
    def of(cls, clip: ClipRange) -> "LossSettings":
        """``clip`` itself when it is a LossSettings, else its clip with the default hyper-parameters."""
        return clip if isinstance(clip, LossSettings) else cls(clip.eps_low, clip.eps_high, clip.dual_clip_c)


class PolicyLossResult(NamedTuple):
    per_token_loss: torch.Tensor  # [batch, response_len], 0 off the mask
    metrics: dict[str, torch.Tensor]  # token sums (0-dim) and token sets (bool [batch, response_len])


PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ClipRange], PolicyLossResult]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def batch_coupled(loss: PolicyLoss) -> PolicyLoss:
    """Mark ``loss`` as coupling the tokens of one call: it chooses tokens from statistics of the
    whole batch it is given (Clip-Cov, KL-Cov), so a token's loss depends on the other samples.

    Such a loss is exactly what verl computes per micro-batch, and no more: its gradient depends on
    how the mini-batch is split (``micro_batch_size``) and on the zero-advantage samples, which
    the trainer therefore runs too. The invariance laws hold for it only within one call.
    """
    loss.batch_coupled = True  # type: ignore[attr-defined]
    return loss


def is_batch_coupled(loss: PolicyLoss) -> bool:
    """Whether ``loss`` was marked with :func:`batch_coupled`."""
    return bool(getattr(loss, "batch_coupled", False))


def ratio_metrics(ratio: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token sums of the per-token ratio π_θ/π_old and of the k3 estimate of KL(π_old‖π_θ),
    ``(r - 1) - log r``, over ``valid`` tokens (``ratio`` detached): the ``ratio_mean`` and
    ``approx_kl`` metrics every registered loss reports (the trainer divides by the token count)."""
    kl = (ratio - 1.0) - torch.log(ratio.clamp_min(1e-30))
    return {"ratio_mean": ratio[valid].sum(), "approx_kl": kl[valid].sum()}


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log π_θ − log π_old`` per token ``[b, T]``, exactly 0 off ``valid``: padding may hold
    arbitrary log-probs, and a zero there keeps ``exp()`` from overflowing. For a new loss's ratio."""
    return torch.where(valid, logp - old_logp, torch.zeros_like(logp))


def masked(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` with exact zeros off ``valid`` (padding may hold inf or NaN; where() drops them
    from the gradient too)."""
    return torch.where(valid, values, torch.zeros_like(values))


@POLICY_LOSSES.register("decoupled_clip")
def decoupled_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: ClipRange = ClipRange()) -> PolicyLossResult:
    """DAPO's Clip-Higher PPO surrogate (DAPO eq. 10): ``-min(r·A, clip(r, 1-ε_low, 1+ε_high)·A)``
    with the token ratio ``r = π_θ/π_old``.

    Symmetric PPO/GRPO clipping is ``eps_low == eps_high``. With ``dual_clip_c`` (> 1) the loss of
    a negative-advantage token is further bounded by ``-c·A`` (Ye et al. 2020), so a token whose
    ratio exploded cannot dominate the update. verl: ``policy_loss.loss_mode=vanilla``; TRL:
    ``loss_type="dapo"`` with ``importance_sampling_level="token"``.

    Metrics: ``clip_frac_low`` (A < 0 and r < 1-ε_low: the clip removed the token's gradient),
    ``clip_frac_high`` (A > 0 and r > 1+ε_high), ``dual_clip_frac``, ``ratio_mean``,
    ``approx_kl``; token sets ``clip_low`` and ``clip_high``.
    """
    valid = mask.bool()
    ratio = torch.exp(token_log_ratio(logp, old_logp, valid))
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high))

    r = ratio.detach()
    negative = advantages < 0
    clipped_low = valid & negative & (r < 1.0 - clip.eps_low)
    clipped_high = valid & (advantages > 0) & (r > 1.0 + clip.eps_high)
    dual_clipped = torch.zeros_like(valid)
    if clip.dual_clip_c is not None:
        dual_bound = -advantages * clip.dual_clip_c
        dual_clipped = valid & negative & (loss.detach() > dual_bound)
        loss = torch.where(negative, torch.minimum(loss, dual_bound), loss)
    metrics = {"clip_frac_low": clipped_low.sum(), "clip_frac_high": clipped_high.sum(),
               "dual_clip_frac": dual_clipped.sum(), **ratio_metrics(r, valid),
               "clip_low": clipped_low, "clip_high": clipped_high}
    return PolicyLossResult(torch.where(valid, loss, torch.zeros_like(loss)), metrics)


@POLICY_LOSSES.register("gspo")
def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip: ClipRange = ClipRange(3e-4, 4e-4)) -> PolicyLossResult:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), in its GSPO-token form (eqs. 13-14).

    The sequence ratio is the geometric mean of the token ratios over the response's loss tokens,
    ``s_i = exp(mean_t(log π_θ - log π_old))``, clipped to ``[1-ε_low, 1+ε_high]`` for the whole
    sequence. Each token carries ``s_it = sg[s_i]·π_θ(t)/sg[π_θ(t)]``: its value is ``s_i`` and its
    gradient is ``s_i·∇log π_θ(t)``, so ``-min(s_it·A, clip(s_it)·A)`` aggregated with
    ``seq-mean-token-mean`` is the paper's sequence objective (eq. 5) with its gradient.

    Its ε are those of a *sequence* ratio, ~1e-3, not 0.2: the paper uses ε_low = 3e-4 and
    ε_high = 4e-4 (``clip.eps_low=3e-4 clip.eps_high=4e-4``) and ``loss.agg_mode=seq-mean-token-mean``.
    verl: ``policy_loss.loss_mode=gspo``; TRL: ``importance_sampling_level="sequence"``.

    Metrics as :func:`decoupled_clip_loss`, counting every token of a clipped sequence; the ratio
    is the sequence ratio.
    """
    valid = mask.bool()
    log_ratio = token_log_ratio(logp, old_logp, valid)
    lengths = valid.sum(-1, keepdim=True).clamp_min(1)
    seq_log_ratio = (log_ratio.sum(-1, keepdim=True) / lengths).detach()  # [batch, 1] log s_i
    # Value s_i on every token; gradient s_i · ∇ log π_θ(t). Capped so a wild sequence cannot overflow.
    token_ratio = torch.exp((seq_log_ratio + logp - logp.detach()).clamp(max=20.0))
    token_ratio = torch.where(valid, token_ratio, torch.ones_like(token_ratio))
    loss = torch.maximum(-advantages * token_ratio, -advantages * token_ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high))
    s = token_ratio.detach()
    clipped_low = valid & (advantages < 0) & (s < 1.0 - clip.eps_low)
    clipped_high = valid & (advantages > 0) & (s > 1.0 + clip.eps_high)
    metrics = {"clip_frac_low": clipped_low.sum(), "clip_frac_high": clipped_high.sum(),
               "ratio_mean": s[valid].sum(), "approx_kl": ratio_metrics(torch.exp(log_ratio.detach()), valid)["approx_kl"],
               "clip_low": clipped_low, "clip_high": clipped_high}
    return PolicyLossResult(torch.where(valid, loss, torch.zeros_like(loss)), metrics)


@POLICY_LOSSES.register("cispo")
def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip: ClipRange = ClipRange()) -> PolicyLossResult:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): ``-sg(clip(r, 1-ε_low, 1+ε_high))·A·log π_θ``.

    The importance weight is clipped and detached instead of the update: every token keeps a
    gradient ``clip(r)·A·∇log π_θ`` (PPO's clip drops the gradient of tokens outside the range,
    among them the rare "fork" tokens whose probability grows fastest). Use with
    ``loss.agg_mode=token-mean`` as the paper does. MiniMax leaves the lower bound effectively
    open (a large ``clip.eps_low``, below 1) and tunes ``clip.eps_high``. verl:
    ``policy_loss.loss_mode=cispo``; TRL: ``loss_type="cispo"``, whose ``epsilon_high`` is the
    absolute upper bound of the weight (our ``1 + eps_high``) with no lower bound.

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` count tokens whose weight was clipped below /
    above (their gradient is scaled, not dropped); ``ratio_mean``, ``approx_kl``; token sets
    ``clip_low`` and ``clip_high``.
    """
    valid = mask.bool()
    ratio = torch.exp(token_log_ratio(logp, old_logp, valid)).detach()
    weight = ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high)
    loss = -weight * advantages * torch.where(valid, logp, torch.zeros_like(logp))
    clipped_low = valid & (ratio < 1.0 - clip.eps_low)
    clipped_high = valid & (ratio > 1.0 + clip.eps_high)
    metrics = {"clip_frac_low": clipped_low.sum(), "clip_frac_high": clipped_high.sum(), **ratio_metrics(ratio, valid),
               "clip_low": clipped_low, "clip_high": clipped_high}
    return PolicyLossResult(torch.where(valid, loss, torch.zeros_like(loss)), metrics)
