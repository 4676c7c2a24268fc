"""Reduce a per-token loss to the scalar that is back-propagated.

Modes (names as in verl):

==========================  ===============================================================
``token-mean``              DAPO: Σ_i Σ_t l_it / Σ_i |o_i| — every token weighs the same.
``seq-mean-token-mean``     GRPO: 1/N Σ_i (Σ_t l_it / |o_i|) — every sequence weighs the same.
``seq-mean-token-sum``      1/N Σ_i Σ_t l_it.
``seq-mean-token-sum-norm`` Dr. GRPO: 1/N Σ_i Σ_t l_it / C, C a constant (e.g. max response
                            length). Note: verl's variant divides by C only; ours keeps the 1/N
                            of the sequence mean, as the Dr. GRPO objective does.
==========================  ===============================================================

N counts the sequences with at least one loss-contributing token: an overlong-filtered response
is absent from both numerator and denominator.

**Exactness under splitting.** Every mode is ``Σ_i contribution_i / normaliser`` where the
normaliser is a count (tokens or sequences) over the *whole* optimiser step. Compute it once with
:func:`loss_normalizer` over the mini-batch (summing across micro-batches and ranks), pass it to
:func:`aggregate_loss` for each micro-batch, and the summed micro-batch gradients equal the
gradient of the whole mini-batch exactly (to float rounding).
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}")


def loss_normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The count that divides the summed contributions: tokens for ``token-mean``, sequences otherwise.

    Args:
        mask: ``[batch, response_len]`` 1 where a token contributes to the loss.
        mode: one of :data:`LOSS_AGG_MODES`.
    Returns:
        0-dim float tensor; add these up over micro-batches (and all-reduce over ranks).
    """
    _check_mode(mode)
    if mode == "token-mean":
        return mask.sum().to(torch.float32)
    return (mask.sum(dim=-1) > 0).sum().to(torch.float32)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    normalizer: torch.Tensor | float | None = None,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce ``[batch, response_len]`` per-token losses to a scalar.

    Args:
        per_token_loss: ``[batch, response_len]``.
        mask: ``[batch, response_len]`` 1 where a token contributes.
        mode: one of :data:`LOSS_AGG_MODES`.
        normalizer: the global count from :func:`loss_normalizer` for the whole optimiser step;
            ``None`` uses this batch's own count (correct only when the batch *is* the step).
        norm_constant: the constant C of ``seq-mean-token-sum-norm`` (required for that mode).
    Returns:
        0-dim loss. With an empty normaliser (nothing contributes) the loss is 0 with a
        zero gradient rather than NaN.
    """
    _check_mode(mode)
    weights = mask.to(per_token_loss.dtype)
    token_sums = (per_token_loss * weights).sum(dim=-1)
    if mode == "token-mean":
        numerator = token_sums.sum()
    elif mode == "seq-mean-token-mean":
        lengths = weights.sum(dim=-1)
        numerator = (token_sums / lengths.clamp_min(1.0)).sum()
    elif mode == "seq-mean-token-sum":
        numerator = token_sums.sum()
    else:
        if norm_constant is None or norm_constant <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a positive norm_constant (e.g. the max response length)")
        numerator = token_sums.sum() / norm_constant
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode)
    normalizer = torch.as_tensor(normalizer, dtype=numerator.dtype)
    return numerator / normalizer.clamp_min(1.0)
