"""Rollout correction: the sampler's distribution π_rollout against the trainer's π_old.

Every sample carries three log-probabilities per token:

- **π_rollout**: what the sampler (fast engine, vLLM) reported while sampling;
- **π_old**: the trainer's forward at rollout time, the anchor of the PPO clip;
- **π_θ**: the trainer's forward now, with gradients.

In fp32 with an in-process engine π_rollout and π_old agree to ~1e-6. A bf16 vLLM engine, or a
group sampled by an older policy, makes them differ; the samples then come from π_rollout while
the loss assumes π_old. The correction reweights (or rejects) tokens by the importance weight
``w = π_old / π_rollout``, per token, or per sequence as the geometric mean
``exp(mean_t log(π_old/π_rollout))`` over the response's loss tokens (so long responses are not
penalised for their length). With ``C = cap``:

==========================  ===============================================================
``none``                    weights 1, mask unchanged
``token_truncate``          the loss of each token is multiplied by ``min(w_t, C)``
``token_mask``              tokens with ``w_t`` outside ``[1/C, C]`` leave the loss
``sequence_truncate``       every token of a sequence weighed by ``min(w_seq, C)``
``sequence_mask``           sequences with ``w_seq`` outside ``[1/C, C]`` leave the loss
==========================  ===============================================================

Masked tokens leave the loss and its normaliser, like overlong-filtered ones. verl:
``algorithm.rollout_correction`` (``rollout_is``: token / sequence, ``rollout_rs``: rejection
sampling, ``rollout_is_threshold``); TRL: ``vllm_importance_sampling_correction``,
``vllm_importance_sampling_mode`` (``token_truncate``, ``token_mask``, ``sequence_truncate``,
``sequence_mask``) and ``vllm_importance_sampling_cap``.

Every mode has one signature ``fn(old_logp, rollout_logp, mask, cap) -> Correction``, all tensors
``[batch, response_len]``, registered in :data:`ROLLOUT_CORRECTIONS`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from dapo_rl.algorithm.registry import Registry


class Correction(NamedTuple):
    weights: torch.Tensor  # [batch, response_len] multiplies the per-token loss (1 off the mask)
    mask: torch.Tensor  # [batch, response_len] the loss mask after rejection (same dtype as the input mask)


RolloutCorrection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], Correction]
ROLLOUT_CORRECTIONS: Registry[RolloutCorrection] = Registry("rollout correction mode")


def log_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log(π_old / π_rollout)`` per token, 0 off the mask ``[batch, response_len]``."""
    return torch.where(mask.bool(), old_logp - rollout_logp, torch.zeros_like(old_logp))


def sequence_log_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_t log(π_old / π_rollout)`` over each sequence's loss tokens ``[batch, 1]`` (0 for an empty row)."""
    return log_weights(old_logp, rollout_logp, mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)


def _inside(log_w: torch.Tensor, cap: float) -> torch.Tensor:
    bound = torch.log(torch.tensor(float(cap), dtype=log_w.dtype))
    return (log_w >= -bound) & (log_w <= bound)


@ROLLOUT_CORRECTIONS.register("none")
def no_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> Correction:
    return Correction(torch.ones_like(old_logp), mask)


@ROLLOUT_CORRECTIONS.register("token_truncate")
def token_truncate(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> Correction:
    return Correction(torch.exp(log_weights(old_logp, rollout_logp, mask)).clamp(max=cap), mask)


@ROLLOUT_CORRECTIONS.register("token_mask")
def token_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> Correction:
    keep = _inside(log_weights(old_logp, rollout_logp, mask), cap)
    return Correction(torch.ones_like(old_logp), mask * keep.to(mask.dtype))


@ROLLOUT_CORRECTIONS.register("sequence_truncate")
def sequence_truncate(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> Correction:
    weight = torch.exp(sequence_log_weights(old_logp, rollout_logp, mask)).clamp(max=cap)
    return Correction(torch.where(mask.bool(), weight.expand_as(old_logp), torch.ones_like(old_logp)), mask)


@ROLLOUT_CORRECTIONS.register("sequence_mask")
def sequence_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> Correction:
    keep = _inside(sequence_log_weights(old_logp, rollout_logp, mask), cap)
    return Correction(torch.ones_like(old_logp), mask * keep.to(mask.dtype))


def mismatch_metrics(log_w: list[torch.Tensor], sequence_level: bool, masked_tokens: float) -> dict[str, float]:
    """How far the sampler is from the trainer, over one step's trained samples.

    Args:
        log_w: per sample, ``log(π_old/π_rollout)`` of each loss token ``[len_i]`` (before any
            rejection).
        sequence_level: report the importance weights per sequence (geometric mean) instead of per token.
        masked_tokens: loss tokens the correction removed.
    Returns:
        ``rollout/logp_abs_diff`` (mean |log π_old − log π_rollout| per token),
        ``rollout/kl`` (k3 estimate of KL(π_rollout‖π_old) per token: ``w − 1 − log w``),
        ``rollout/is_weight_mean`` / ``_max`` and ``rollout/ess_frac`` (effective sample size
        ``(Σw)² / (n·Σw²)`` as a fraction of n) of the weights, ``rollout/masked_frac``.
    """
    rows = [row.double() for row in log_w if row.numel()]
    if not rows:
        return {}
    tokens = torch.cat(rows)
    weights = torch.stack([row.mean() for row in rows]).exp() if sequence_level else tokens.exp()
    return {
        "rollout/logp_abs_diff": tokens.abs().mean().item(),
        "rollout/kl": (tokens.exp() - 1.0 - tokens).mean().item(),
        "rollout/is_weight_mean": weights.mean().item(),
        "rollout/is_weight_max": weights.max().item(),
        "rollout/ess_frac": (weights.sum().square() / (weights.numel() * weights.square().sum())).item(),
        "rollout/masked_frac": masked_tokens / tokens.numel(),
    }
