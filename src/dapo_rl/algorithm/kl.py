"""Per-token KL-penalty estimators for the optional reference-model term (off in DAPO),
registered by name in :data:`KL_ESTIMATORS`.

Every estimator has one signature, ``fn(logp, ref_logp) -> kl``, all ``[batch, response_len]``,
with ``log_ratio = logp - ref_logp`` for tokens sampled from the current policy (Schulman 2020,
"Approximating KL divergence"). verl: ``actor.kl_loss_type``; TRL always uses k3. An estimator
of one's own is given by import path, ``loss.kl_estimator=package.module:function``.
"""

from __future__ import annotations

from typing import Callable

import torch

from dapo_rl.algorithm.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log_ratio``: unbiased for KL(π‖π_ref), high variance, can be negative."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log_ratio² / 2``: biased, low variance."""
    return 0.5 * (logp - ref_logp).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(-log_ratio) + log_ratio - 1``: unbiased, non-negative, low variance (GRPO's choice)."""
    # Clamp so a single wild token cannot overflow exp(); the estimate is then still >= 0.
    neg = (ref_logp - logp).clamp(max=20.0)
    return torch.exp(neg) - neg - 1.0
