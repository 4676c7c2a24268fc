"""Per-token KL-penalty estimators for the optional reference-model term (off in DAPO).

With ``log_ratio = logp - ref_logp`` for tokens sampled from the current policy (Schulman 2020,
"Approximating KL divergence"):

- ``k1``: ``log_ratio`` — unbiased for KL(π‖π_ref), high variance, can be negative.
- ``k2``: ``log_ratio² / 2`` — biased, low variance.
- ``k3``: ``exp(-log_ratio) + log_ratio - 1`` — unbiased, non-negative, low variance (GRPO's choice).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate; shapes ``[batch, response_len]`` in and out."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # Clamp so a single wild token cannot overflow exp(); the estimate is then still >= 0.
        neg = (-log_ratio).clamp(max=20.0)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
