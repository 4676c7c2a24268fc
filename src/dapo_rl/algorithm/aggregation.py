"""Reduce a per-token loss to the scalar that is back-propagated; modes registered by name in
:data:`LOSS_AGG_MODES` (names as in verl's ``actor.loss_agg_mode``).

==========================  ===============================================================
``token-mean``              DAPO: Σ_i Σ_t l_it / Σ_i |o_i| — every token weighs the same.
                            TRL ``loss_type="dapo"``.
``seq-mean-token-mean``     GRPO: 1/N Σ_i (Σ_t l_it / |o_i|) — every sequence weighs the same.
                            TRL ``loss_type="grpo"``.
``seq-mean-token-sum``      1/N Σ_i Σ_t l_it.
``seq-mean-token-sum-norm`` Dr. GRPO: 1/N Σ_i Σ_t l_it / C, C a constant (e.g. max response
                            length), as the Dr. GRPO objective and verl 0.9.1 (whose
                            ``loss_scale_factor`` is C) do; older verl divided by C only.
                            TRL ``loss_type="dr_grpo"``.
==========================  ===============================================================

Every mode is one :class:`Aggregation`: a function ``fn(per_token_loss, mask, norm_constant) ->
numerator`` (the summed contributions, ``[batch]`` summed to a scalar) and what its normaliser
counts, ``"tokens"`` or ``"sequences"``. N counts the sequences with at least one
loss-contributing token: an overlong-filtered response is absent from both numerator and
denominator. A mode of one's own is an :class:`Aggregation` bound to a name in its module, given
as ``loss.agg_mode=package.module:NAME``.

**Exactness under splitting.** Every mode is ``Σ_i contribution_i / normaliser`` where the
normaliser is a count (tokens or sequences) over the *whole* optimiser step. Compute it once with
:func:`loss_normalizer` over the mini-batch (summing across micro-batches and ranks), pass it to
:func:`aggregate_loss` for each micro-batch, and the summed micro-batch gradients equal the
gradient of the whole mini-batch exactly (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dapo_rl.algorithm.registry import Registry

COUNTS = ("tokens", "sequences")  # what a mode's normaliser counts


@dataclass(frozen=True)
class Aggregation:
    """One loss aggregation mode.

    Args:
        numerator: ``fn(per_token_loss, weights, norm_constant) -> 0-dim`` summed contributions;
            ``per_token_loss`` and ``weights`` are ``[batch, response_len]``.
        counts: what the normaliser counts: ``"tokens"`` or ``"sequences"``.
    """

    numerator: Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]
    counts: str

    def __post_init__(self) -> None:
        if not callable(self.numerator):
            raise ValueError(f"Aggregation.numerator must be a function, got a {type(self.numerator).__name__}")
        if self.counts not in COUNTS:
            raise ValueError(f"Aggregation.counts must be one of {', '.join(COUNTS)}, got {self.counts!r}")


def _imported_aggregation(path: str, obj: object) -> Aggregation:
    """An import path's object as a mode: it must be an :class:`Aggregation`, since a bare function
    does not say what its normaliser counts."""
    if not isinstance(obj, Aggregation):
        raise ValueError(f"loss aggregation mode {path!r} is a {type(obj).__name__}, not an Aggregation; define it as "
                         f"Aggregation(numerator, counts='tokens' or 'sequences') "
                         f"(from dapo_rl.algorithm.aggregation import Aggregation)")
    return obj


LOSS_AGG_MODES: Registry[Aggregation] = Registry("loss aggregation mode", adapt=_imported_aggregation)


def _summed(per_token_loss: torch.Tensor, weights: torch.Tensor, norm_constant: float | None) -> torch.Tensor:
    # Σ_i Σ_t l_it: token-mean and seq-mean-token-sum differ only in what divides it.
    return (per_token_loss * weights).sum(-1).sum()


def _sequence_means(per_token_loss: torch.Tensor, weights: torch.Tensor, norm_constant: float | None) -> torch.Tensor:
    return ((per_token_loss * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)).sum()


def _summed_over_constant(per_token_loss: torch.Tensor, weights: torch.Tensor, norm_constant: float | None) -> torch.Tensor:
    if norm_constant is None or norm_constant <= 0:
        raise ValueError("seq-mean-token-sum-norm needs a positive norm_constant (e.g. the max response length)")
    return (per_token_loss * weights).sum(-1).sum() / norm_constant


LOSS_AGG_MODES.register("token-mean", Aggregation(_summed, counts="tokens"))
LOSS_AGG_MODES.register("seq-mean-token-mean", Aggregation(_sequence_means, counts="sequences"))
LOSS_AGG_MODES.register("seq-mean-token-sum", Aggregation(_summed, counts="sequences"))
LOSS_AGG_MODES.register("seq-mean-token-sum-norm", Aggregation(_summed_over_constant, counts="sequences"))


def loss_normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The count that divides the summed contributions: tokens or sequences, as the mode's
    :attr:`Aggregation.counts` says (tokens for ``token-mean``, sequences for the others).

    Args:
        mask: ``[batch, response_len]`` 1 where a token contributes to the loss.
        mode: a name in :data:`LOSS_AGG_MODES` or an import path ``package.module:NAME`` of an
            :class:`Aggregation`.
    Returns:
        0-dim float tensor; add these up over micro-batches (and all-reduce over ranks).
    """
    if LOSS_AGG_MODES.get(mode).counts == "tokens":
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
        mode: a name in :data:`LOSS_AGG_MODES` or an import path ``package.module:NAME`` of an
            :class:`Aggregation`.
        normalizer: the global count from :func:`loss_normalizer` for the whole optimiser step;
            ``None`` uses this batch's own count (correct only when the batch *is* the step).
        norm_constant: the constant C of ``seq-mean-token-sum-norm`` (required for that mode).
    Returns:
        0-dim loss. With an empty normaliser (nothing contributes) the loss is 0 with a
        zero gradient rather than NaN.
    """
    numerator = LOSS_AGG_MODES.get(mode).numerator(per_token_loss, mask.to(per_token_loss.dtype), norm_constant)
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode)
    normalizer = torch.as_tensor(normalizer, dtype=numerator.dtype)
    return numerator / normalizer.clamp_min(1.0)
