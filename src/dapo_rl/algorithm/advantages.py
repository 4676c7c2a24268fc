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

from dapo_rl.algorithm.registry import Registry

AdvantageEstimator = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [num_groups, group_size], got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {rewards.shape[1]}")


def _zero_spread(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups, 1] bool: groups whose rewards are all identical."""
    return (rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True))


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """DAPO/GRPO: ``(R - mean_group(R)) / (std_group(R) + eps)`` (DAPO eq. 9). verl
    ``algorithm.adv_estimator=grpo``; TRL ``scale_rewards="group"``.

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


@ADVANTAGE_ESTIMATORS.register("drgrpo")
def drgrpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): ``R - mean_group(R)``, no std normalisation
    (dividing by it favours groups that are nearly all right or all wrong). verl
    ``algorithm.norm_adv_by_std_in_grpo=false``; TRL ``scale_rewards="none"``.

    Args:
        rewards: ``[num_groups, group_size]`` scalar rewards.
        eps: unused; accepted so all estimators share one signature.
    Returns:
        ``[num_groups, group_size]`` advantages; exactly 0 for zero-spread groups.
    """
    _check_groups(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred.masked_fill(_zero_spread(rewards), 0.0)


def broadcast_to_tokens(sequence_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its sequence's advantage.

    Args:
        sequence_advantages: ``[batch]`` one advantage per sequence.
        response_mask: ``[batch, response_len]`` 1 for response tokens, 0 for padding.
    Returns:
        ``[batch, response_len]`` advantages, 0 on padding.
    """
    return sequence_advantages.unsqueeze(-1) * response_mask.to(sequence_advantages.dtype)
