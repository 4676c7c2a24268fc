"""Group-relative advantage estimators.

Every estimator has one signature, ``fn(rewards, *, eps) -> advantages``, where ``rewards`` is a
float tensor of shape ``[num_groups, group_size]`` (row g holds the G rewards of the samples drawn
for prompt g) and the result has the same shape: one advantage per sequence. Broadcast to tokens
with :func:`broadcast_to_tokens`.

Std convention: the *unbiased* (Bessel-corrected, divide by G-1) standard deviation, as
``torch.std`` computes it and as verl and TRL use. A group whose rewards are all equal has zero
spread and gets an advantage of exactly 0 (never NaN, never a rounding residue), whatever the
estimator.
"""

from __future__ import annotations

from typing import Callable

import torch

AdvantageEstimator = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Register ``fn`` under ``name`` so configurations can select it by name."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [num_groups, group_size], got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {rewards.shape[1]}")


def _zero_spread(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups, 1] bool: groups whose rewards are all identical."""
    return (rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True))


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """DAPO/GRPO: ``(R - mean_group(R)) / (std_group(R) + eps)``.

    Args:
        rewards: ``[num_groups, group_size]`` scalar rewards.
        eps: added to the std so a near-zero spread does not blow up.
    Returns:
        ``[num_groups, group_size]`` advantages; exactly 0 for zero-spread groups.
    """
    _check_groups(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    advantages = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return advantages.masked_fill(_zero_spread(rewards), 0.0)


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: ``R - mean_group(R)``, no std normalisation (it biases toward easy/hard groups).

    Args:
        rewards: ``[num_groups, group_size]`` scalar rewards.
        eps: unused; accepted so all estimators share one signature.
    Returns:
        ``[num_groups, group_size]`` advantages; exactly 0 for zero-spread groups.
    """
    _check_groups(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred.masked_fill(_zero_spread(rewards), 0.0)


def group_advantages(rewards: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages with the std normalisation switch of the config (``advantage.norm_by_std``)."""
    return (grpo_advantages if norm_by_std else drgrpo_advantages)(rewards, eps=eps)


def broadcast_to_tokens(sequence_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its sequence's advantage.

    Args:
        sequence_advantages: ``[batch]`` one advantage per sequence.
        response_mask: ``[batch, response_len]`` 1 for response tokens, 0 for padding.
    Returns:
        ``[batch, response_len]`` advantages, 0 on padding.
    """
    return sequence_advantages.unsqueeze(-1) * response_mask.to(sequence_advantages.dtype)
