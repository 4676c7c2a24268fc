"""Overlong reward shaping (DAPO §3.4): soft overlong punishment and overlong filtering."""

from __future__ import annotations

import torch


def soft_overlong_penalty(response_lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """Length-aware penalty added to the rule-based reward.

    With ``L_max = max_length`` and ``L_cache = cache_length``::

        0                                   if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
        -1                                  if |y| > L_max

    Args:
        response_lengths: ``[batch]`` response lengths in tokens (int or float).
        max_length: ``L_max``, the largest response length that is not punished fully.
        cache_length: ``L_cache``, width of the linear punishment interval; ``0 < L_cache < L_max``.
    Returns:
        ``[batch]`` float penalties in ``[-1, 0]``.
    """
    if not 0 < cache_length < max_length:
        raise ValueError(f"need 0 < cache_length < max_length, got cache_length={cache_length}, max_length={max_length}")
    lengths = response_lengths.to(torch.float64)
    expected = max_length - cache_length
    linear = (expected - lengths) / cache_length
    penalty = torch.where(lengths <= expected, torch.zeros_like(lengths), linear)
    penalty = torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)
    return penalty.to(torch.get_default_dtype())


def overlong_filter_mask(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Remove truncated responses from the loss (and so from the loss normaliser).

    The responses still count in their group's reward statistics: apply this to the loss mask,
    after advantages are computed.

    Args:
        response_mask: ``[batch, response_len]`` 1 for response tokens.
        truncated: ``[batch]`` bool, True where generation stopped at the length limit.
    Returns:
        ``[batch, response_len]`` mask with truncated rows zeroed, same dtype as ``response_mask``.
    """
    keep = (~truncated.bool()).to(response_mask.dtype).unsqueeze(-1)
    return response_mask * keep
