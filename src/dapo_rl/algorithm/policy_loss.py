"""Policy-gradient losses, per token.

Every loss has one signature::

    fn(logp, old_logp, advantages, mask, *, eps_low, eps_high, dual_clip_c) -> PolicyLossOutput

with ``logp``/``old_logp``/``advantages``/``mask`` all ``[batch, response_len]``: log-probabilities
(natural log, at the sampling temperature) of the sampled tokens under the current and the old
policy, the per-token advantage, and 1 where a token contributes to the loss. The loss is the
*negative* objective; reduce it with :func:`dapo_rl.algorithm.aggregation.aggregate_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PolicyLoss = Callable[..., "PolicyLossOutput"]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Register ``fn`` under ``name`` so configurations can select it by name."""

    def decorator(fn: PolicyLoss) -> PolicyLoss:
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


@dataclass
class PolicyLossOutput:
    """Per-token loss and the per-token events behind the clip statistics.

    All tensors are ``[batch, response_len]``; the bool ones are already restricted to the mask.
    """

    per_token_loss: torch.Tensor
    ratio: torch.Tensor  # pi_theta / pi_old, detached
    clipped_low: torch.Tensor  # A < 0 and ratio < 1 - eps_low: the clip removed this token's gradient
    clipped_high: torch.Tensor  # A > 0 and ratio > 1 + eps_high
    dual_clipped: torch.Tensor  # A < 0 and ratio > c: bounded by the dual clip

    def token_sums(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over valid tokens, to be added up across micro-batches and divided by the token count.

        ``approx_kl`` is the k3 estimate of KL(old || new): ``(r - 1) - log r`` per token.
        """
        valid = mask.bool()
        log_ratio = torch.log(self.ratio.clamp_min(1e-30))
        kl = (self.ratio - 1.0) - log_ratio
        return {
            "clip_frac_low": self.clipped_low.sum(),
            "clip_frac_high": self.clipped_high.sum(),
            "dual_clip_frac": self.dual_clipped.sum(),
            "ratio_mean": self.ratio[valid].sum(),
            "approx_kl": kl[valid].sum(),
        }


@register_policy_loss("decoupled_clip")
def decoupled_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = None,
) -> PolicyLossOutput:
    """DAPO's Clip-Higher PPO surrogate: ``-min(r·A, clip(r, 1-eps_low, 1+eps_high)·A)``.

    With ``dual_clip_c`` (> 1), the loss of a negative-advantage token is further bounded by
    ``-c·A`` (Ye et al. 2020), so a token whose ratio exploded cannot dominate the update.
    Symmetric PPO/GRPO clipping is ``eps_low == eps_high``.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    valid = mask.bool()
    # Padding may hold arbitrary log-probs; zero the difference there so exp() cannot overflow.
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    loss = torch.maximum(unclipped_loss, clipped_loss)

    detached_ratio = ratio.detach()
    negative = advantages < 0
    clipped_low = valid & negative & (detached_ratio < 1.0 - eps_low)
    clipped_high = valid & (advantages > 0) & (detached_ratio > 1.0 + eps_high)
    dual_clipped = torch.zeros_like(valid)
    if dual_clip_c is not None:
        dual_bound = -advantages * dual_clip_c
        dual_clipped = valid & negative & (loss.detach() > dual_bound)
        loss = torch.where(negative, torch.minimum(loss, dual_bound), loss)

    return PolicyLossOutput(
        per_token_loss=loss * mask.to(loss.dtype),
        ratio=detached_ratio,
        clipped_low=clipped_low,
        clipped_high=clipped_high,
        dual_clipped=dual_clipped,
    )
