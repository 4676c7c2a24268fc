"""What one step's policy update adds up, across micro-batches and ranks, and reports.

The trainer never knows which loss it runs: it adds up the loss's metrics by their kind (see
:mod:`dapo_rl.algorithm.policy_loss`): 0-dim tensors are sums over trained tokens, reported per
token; bool tensors are token sets, reported as quantiles of the old-policy probability of their
tokens (the DAPO paper's diagnostic of which tokens the clip acts on).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from dapo_rl.training.distributed import DistContext


def quantiles(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_mean`` and the 10th, 50th and 90th percentiles of ``values`` (none if empty)."""
    if values.numel() == 0:
        return {}
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_p10": q[0].item(), f"{prefix}_p50": q[1].item(), f"{prefix}_p90": q[2].item()}


class StepMetrics:
    """Token sums, trained-token counts and token-set probabilities of one update step."""

    def __init__(self) -> None:
        self.token_sums: dict[str, float] = defaultdict(float)
        self.old_probs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.loss_tokens = 0.0  # tokens in the loss (the per-token metrics' denominator)
        self.trained_tokens = 0.0  # response tokens forwarded and back-propagated

    def add(self, mask: torch.Tensor, entropy: torch.Tensor, loss_metrics: dict[str, torch.Tensor],
            old_logp: torch.Tensor, response_tokens: int) -> None:
        """One micro-batch: its loss mask, entropies, the loss's metrics and π_old ``[b, R]``."""
        self.loss_tokens += mask.sum().item()
        self.trained_tokens += response_tokens
        self.token_sums["entropy"] += (entropy * mask).sum().item()
        for name, value in loss_metrics.items():
            if value.dim() == 0:
                self.token_sums[name] += value.item()
            else:
                self.old_probs[name].append(old_logp.detach()[value].exp().float().cpu())

    def reduce(self, dist: DistContext) -> None:
        """Add every rank's share into every rank's copy (collective when distributed)."""
        if not dist.enabled:
            return
        shares = dist.all_gather_objects((dict(self.token_sums), dict(self.old_probs), self.loss_tokens, self.trained_tokens))
        self.token_sums, self.old_probs = defaultdict(float), defaultdict(list)
        self.loss_tokens = self.trained_tokens = 0.0
        for sums, probs, loss_tokens, trained in shares:
            for name, value in sums.items():
                self.token_sums[name] += value
            for name, parts in probs.items():
                self.old_probs[name].extend(parts)
            self.loss_tokens += loss_tokens
            self.trained_tokens += trained

    def report(self) -> dict[str, float]:
        """``train/<name>`` per loss token, and ``diag/<set>_old_prob_*`` quantiles."""
        denom = max(self.loss_tokens, 1.0)
        out = {f"train/{name}": value / denom for name, value in self.token_sums.items()}
        if "ratio_mean" in self.token_sums and not self.loss_tokens:
            out["train/ratio_mean"] = 1.0
        for name, parts in self.old_probs.items():
            out.update(quantiles(torch.cat(parts) if parts else torch.empty(0), f"diag/{name}_old_prob"))
        return out
