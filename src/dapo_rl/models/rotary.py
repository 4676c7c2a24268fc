"""Rotary position embedding as the fast paths apply it: the model's own rotary module for the
angles, a complex product (pairs made adjacent) or Hugging Face's rotate-half form for the turn.

The angles always come from calling the model's rotary module with position ids, so every RoPE
variant transformers implements (default, linear, dynamic, ``llama3``, ``yarn``, ``longrope``,
Gemma3's per-layer-type local/global tables) is reproduced as the model's ``forward`` computes
it. Dynamic and longrope tables also depend on the longest position in the call; see
:func:`dapo_rl.models.spec.ModelSpec.exact_up_to` for where that is handled.
"""

from __future__ import annotations

import torch


def interleaved_pairs(head_dim: int) -> torch.Tensor:
    """Index ``[d]`` that reorders a head's ``(x_0 … x_{d/2-1}, y_0 … y_{d/2-1})`` into pairs
    ``(x_0, y_0, x_1, y_1, …)``.

    Hugging Face's rotary embedding turns pair ``(x_i, y_i)`` by angle ``θ_i``; with the pairs
    adjacent that is one complex product ``(x_i + i·y_i)·e^{iθ_i}``. Permuting the rows of
    ``W_q`` and ``W_k`` by this index per head puts queries and keys in that order; attention
    scores are sums over the head dimension, so permuting queries and keys alike leaves them
    unchanged (values are not permuted, so neither is the output).
    """
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half, head_dim)], dim=1).reshape(-1)


def rotary_order(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Index ``[d]``: :func:`interleaved_pairs` over the first ``rotary_dim`` dimensions of a head
    (all of them by default), the remaining ones (not rotated: partial rotary, Phi-3) in place."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    return torch.cat([interleaved_pairs(rotary_dim), torch.arange(rotary_dim, head_dim)])


def qk_weight_rows(heads: int, head_dim: int, device=None, rotary_dim: int | None = None) -> torch.Tensor:
    """Row index ``[heads · d]`` applying :func:`rotary_order` to every head of a stacked
    ``[W_q; W_k]`` (``heads`` = query heads + key heads)."""
    order = rotary_order(head_dim, rotary_dim)
    return (torch.arange(heads)[:, None] * head_dim + order).reshape(-1).to(device)


def rotary_cos_sin(rotary_emb, x: torch.Tensor, positions: torch.Tensor, kind: str | None = None):
    """``cos, sin [n, rotary_dim]`` at ``positions [n]`` from the model's rotary module (in
    ``x``'s dtype), for the layer type ``kind`` when the module keeps one table per layer type
    (Gemma3's local and global rotary)."""
    extra = (kind,) if kind is not None else ()
    with torch.no_grad():
        cos, sin = rotary_emb(x, positions[None], *extra)
    return cos[0], sin[0]


def complex_rotary_applies(rotary_emb, dtype: torch.dtype, device, kind: str | None = None) -> bool:
    """Whether rotary embedding can be one complex product: a float32/float64 computation (there
    is no complex bfloat16) and a rotary module that turns dimensions ``i`` and ``i + r/2`` by
    the same angle (``r`` the rotary width), as Hugging Face's variants do."""
    if dtype not in (torch.float32, torch.float64):
        return False
    cos, sin = rotary_cos_sin(rotary_emb, torch.zeros(1, dtype=dtype, device=device), torch.arange(4, device=device), kind)
    half = cos.shape[-1] // 2
    return all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin))


def rotate_pairs(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """``x [..., heads, r]`` in :func:`interleaved_pairs` order, each pair turned by the complex
    ``turn [..., 1, r/2]`` (``e^{iθ}``, scaled by the variant's attention factor); differentiable."""
    pairs = torch.view_as_complex(x.unflatten(-1, (x.shape[-1] // 2, 2)))
    return torch.view_as_real(pairs * turn).flatten(-2)


def rotate_half_form(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``x·cos + rotate_half(x)·sin`` on the first ``r = cos.shape[-1]`` dimensions
    of ``x [..., heads, d]`` (in Hugging Face's order), the rest passed through; differentiable."""
    r = cos.shape[-1]
    turned, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    half = r // 2
    out = turned * cos + torch.cat([-turned[..., half:], turned[..., :half]], dim=-1) * sin
    return out if rest is None else torch.cat([out, rest], dim=-1)


def apply_rotary(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_pairs` on the first ``2 · turn.shape[-1]`` dimensions of ``x [..., heads, d]``
    (in :func:`rotary_order`), the rest passed through; differentiable."""
    r = 2 * turn.shape[-1]
    if r == x.shape[-1]:
        return rotate_pairs(x, turn)
    return torch.cat([rotate_pairs(x[..., :r], turn), x[..., r:]], dim=-1)
