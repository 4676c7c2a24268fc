"""Names this module used to define, kept importable: the fast paths now cover every family a
:class:`~dapo_rl.models.spec.ModelSpec` describes (:mod:`dapo_rl.models.spec`, :mod:`dapo_rl.models.flat`,
:mod:`dapo_rl.models.rotary`), not Llama alone."""

from __future__ import annotations

from dapo_rl.models.flat import FlatResponses, attention, response_logits
from dapo_rl.models.rotary import complex_rotary_applies, interleaved_pairs, qk_weight_rows, rotate_pairs
from dapo_rl.models.spec import supports_fast_path

__all__ = ["FlatResponses", "attention", "response_logits", "complex_rotary_applies", "interleaved_pairs",
           "qk_weight_rows", "rotate_pairs", "is_plain_llama"]


def is_plain_llama(model) -> bool:
    """Former name of :func:`~dapo_rl.models.spec.supports_fast_path` (with no length bound):
    true for every model the spec decoder computes exactly, whatever its family."""
    return supports_fast_path(model)
