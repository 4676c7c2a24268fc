"""Llama-architecture computations written against the model's own modules and weights.

Two parts of the library run a Llama model outside its Hugging Face ``forward``, because that
``forward`` costs more than the arithmetic on small models or wastes work on padding:

- the rollout engine's decode steps (:mod:`dapo_rl.rollout.fast`);
- the trainer's response forward (:func:`response_logits`): every response token of a
  micro-batch in one flat ``[tokens, hidden]`` batch, so no projection or MLP computes padding.

Both accept only what :func:`is_plain_llama` accepts; anything else goes through ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import rotate_half

F = torch.nn.functional


def is_plain_llama(model) -> bool:
    """A Hugging Face Llama whose layers are exactly RMSNorm → rotary attention → SiLU MLP with
    no biases, no tensor-parallel split and SDPA or eager attention (the computation the
    functions here reproduce)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (config is not None and getattr(config, "model_type", None) == "llama" and inner is not None
            and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")
            and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", "silu") == "silu" and getattr(config, "pretraining_tp", 1) == 1
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


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


def qk_weight_rows(heads: int, head_dim: int, device=None) -> torch.Tensor:
    """Row index ``[heads · d]`` applying :func:`interleaved_pairs` to every head of a stacked
    ``[W_q; W_k]`` (``heads`` = query heads + key heads)."""
    order = interleaved_pairs(head_dim)
    return (torch.arange(heads)[:, None] * head_dim + order).reshape(-1).to(device)


def qkv_weight(attn, qk_rows: torch.Tensor | None) -> torch.Tensor:
    """``[W_q; W_k; W_v]`` of an attention module, stacked for one product ``[(heads + 2·kv_heads)·d,
    hidden]``, the query/key rows reordered by ``qk_rows`` (:func:`qk_weight_rows`) when given.
    Differentiable; built per use, since the optimiser changes the weights."""
    qk = torch.cat([attn.q_proj.weight, attn.k_proj.weight])
    if qk_rows is not None:
        qk = qk[qk_rows]
    return torch.cat([qk, attn.v_proj.weight])


def complex_rotary_applies(rotary_emb, dtype: torch.dtype, device) -> bool:
    """Whether rotary embedding can be one complex product: a float32/float64 computation (there
    is no complex bfloat16) and a rotary module that turns dimensions ``i`` and ``i + d/2`` by
    the same angle, as Hugging Face's variants do."""
    if dtype not in (torch.float32, torch.float64):
        return False
    with torch.no_grad():
        cos, sin = rotary_emb(torch.zeros(1, dtype=dtype, device=device), torch.arange(4, device=device)[None])
    half = cos.shape[-1] // 2
    return all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin))


def rotate_pairs(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """``x [..., heads, d]`` in :func:`interleaved_pairs` order, each pair turned by the complex
    ``turn [..., 1, d/2]`` (``e^{iθ}``); differentiable."""
    pairs = torch.view_as_complex(x.unflatten(-1, (x.shape[-1] // 2, 2)))
    return torch.view_as_real(pairs * turn).flatten(-2)


@dataclass
class FlatResponses:
    """Where each real response token of a micro-batch sits, in one flat order.

    Rows are taken group by group (groups of similar length, see ``length_buckets`` in the
    trainer), each row's tokens contiguous and in order. Attention runs per group, padded only
    to the group's widest response.
    """

    row_of: torch.Tensor  # [N] row of each token
    step_of: torch.Tensor  # [N] position of each token within its response
    positions: torch.Tensor  # [N] position id (the row's real prompt length + step)
    # Per group: its rows [g], its width W, and each of its tokens' slot in the [g · W] padded layout.
    groups: list[tuple[torch.Tensor, int, torch.Tensor]]

    @classmethod
    def build(cls, groups: list[list[int]], prompt_lengths: list[int], response_lengths: list[int],
              device: torch.device) -> "FlatResponses":
        row_of, step_of, layouts = [], [], []
        for rows in groups:
            width = max(max(response_lengths[r] for r in rows), 1)
            slots = []
            for i, r in enumerate(rows):
                row_of += [r] * response_lengths[r]
                step_of += range(response_lengths[r])
                slots += range(i * width, i * width + response_lengths[r])
            layouts.append((torch.tensor(rows, device=device), width, torch.tensor(slots, dtype=torch.long, device=device)))
        row_t = torch.tensor(row_of, dtype=torch.long, device=device)
        step_t = torch.tensor(step_of, dtype=torch.long, device=device)
        return cls(row_of=row_t, step_of=step_t, positions=torch.tensor(prompt_lengths, device=device)[row_t] + step_t,
                   groups=layouts)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention written as two batched products, ``q [g, heads, W, d]`` over
    ``k, v [g, kv_heads, L, d]`` with an additive ``mask [g, 1, W, L]`` (or None) → ``[g, heads, W, d]``.

    Same result as ``F.scaled_dot_product_attention`` (grouped-query heads included: query head
    ``j`` reads key/value head ``j // (heads / kv_heads)``, as Hugging Face's ``repeat_kv``), but
    1.2–3× faster forward + backward on a CPU at the small per-group shapes of a response batch,
    where the fused kernel's per-call set-up dominates.
    """
    g, heads, width, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    scores = torch.matmul(q.reshape(g, kv_heads, rep * width, d), k.transpose(-1, -2))  # [g, kv_heads, rep·W, L]
    scores = scores.view(g, kv_heads, rep, width, length) * scale
    if mask is not None:
        scores = scores + mask[:, :, None]
    scores = scores.softmax(-1)
    if dropout:
        scores = F.dropout(scores, dropout)
    return torch.matmul(scores.view(g, kv_heads, rep * width, length), v).view(g, heads, width, d)


def response_logits(model, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], prompt_attention: torch.Tensor,
                    owner: torch.Tensor, tokens: torch.Tensor, flat: FlatResponses) -> torch.Tensor:
    """Logits after every real response token, responses attending to their prompts' cached keys/values.

    All ``N`` real response tokens go through the projections, MLPs, norms and LM head as one
    ``[N, hidden]`` batch (no padding, one matrix product per weight); only attention, a small
    share of the cost, runs per length group on a padded ``[g, heads, W, d]`` layout (with
    :func:`attention`). The model's own modules for everything else; the same computation as its
    ``forward`` with ``past_key_values``, up to summation order (differentiable).

    Args:
        model: a model :func:`is_plain_llama` accepts.
        prompt_kv: per layer ``(keys, values)`` of the distinct prompts, ``[u, kv_heads, P, d]``
            each (rotary applied: what the model's cache holds after a prompt forward).
        prompt_attention: ``[u, P]`` 1 on real prompt tokens, 0 on left padding.
        owner: ``[rows]`` which distinct prompt each response continues.
        tokens: ``[N]`` the response tokens in ``flat`` order.
        flat: where each token sits.

    Returns:
        ``[N, vocab]`` logits; entry j predicts the token after flat token j.
    """
    inner = model.model
    n = tokens.numel()
    x = inner.embed_tokens(tokens)  # [N, hidden]
    cos, sin = inner.rotary_emb(x, flat.positions[None])  # [1, N, d]
    cos, sin = cos[0, :, None], sin[0, :, None]  # [N, 1, d]
    attn0 = inner.layers[0].self_attn
    heads, kv_heads, d = model.config.num_attention_heads, model.config.num_key_value_heads, attn0.head_dim
    # Under autocast the products' outputs are bfloat16/float16, which have no complex type.
    complex_rotary = (not torch.is_autocast_enabled(x.device.type)
                      and complex_rotary_applies(inner.rotary_emb, x.dtype, x.device))
    qk_rows = qk_weight_rows(heads + kv_heads, d, x.device) if complex_rotary else None
    if complex_rotary:
        turn = torch.complex(cos[..., : d // 2], sin[..., : d // 2])  # [N, 1, d/2]
        key_order = interleaved_pairs(d).to(x.device)

    # Per group, an additive mask [g, 1, W, P + W]: the prompt's real tokens, then the response
    # causally. Padded query positions see the prompt only (their outputs are never read).
    prompt_blocked = prompt_attention == 0
    masks, bounds, start = [], [], 0
    for rows, width, slots in flat.groups:
        prompt_part = x.new_zeros((rows.numel(), prompt_attention.shape[1])).masked_fill_(prompt_blocked[owner[rows]], float("-inf"))
        future = torch.ones((width, width), dtype=torch.bool, device=x.device).triu(1)
        response_part = x.new_zeros((width, width)).masked_fill_(future, float("-inf"))
        masks.append(torch.cat([prompt_part[:, None, :].expand(-1, width, -1),
                                response_part[None].expand(rows.numel(), -1, -1)], dim=-1)[:, None])
        bounds.append((start, start + slots.numel()))
        start += slots.numel()

    def padded(t: torch.Tensor, group: int) -> torch.Tensor:
        """The group's tokens of ``t [N, heads, d]`` → ``[g, heads, W, d]``, zeros on padding."""
        rows, width, slots = flat.groups[group]
        lo, hi = bounds[group]
        out = t.new_zeros((rows.numel() * width, *t.shape[1:])).index_copy(0, slots, t[lo:hi])
        return out.view(rows.numel(), width, *t.shape[1:]).transpose(1, 2)

    for layer, (prompt_keys, prompt_values) in zip(inner.layers, prompt_kv):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        # One product for queries, keys and values, query/key rows in pair order for the complex
        # rotary (the prompt's cached keys are permuted to match).
        qkv = F.linear(h, qkv_weight(attn, qk_rows)).view(n, heads + 2 * kv_heads, d)
        if complex_rotary:
            prompt_keys = prompt_keys[..., key_order]
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        if complex_rotary:
            q, k = rotate_pairs(q, turn), rotate_pairs(k, turn)
        else:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        outs = []
        for g, (rows, width, slots) in enumerate(flat.groups):
            prompt_rows = owner[rows]
            out = attention(
                padded(q, g), torch.cat([prompt_keys[prompt_rows], padded(k, g)], dim=2),
                torch.cat([prompt_values[prompt_rows], padded(v, g)], dim=2), masks[g], attn.scaling,
                dropout=attn.attention_dropout if model.training else 0.0,
            )  # [g, heads, W, d]
            outs.append(out.transpose(1, 2).reshape(rows.numel() * width, -1).index_select(0, slots))
        x = x + attn.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))
