"""The trainer's forward: every real token of a micro-batch's distinct prompts and of its
responses in one flat ``[tokens, hidden]`` batch, for every family a
:class:`~dapo_rl.models.spec.ModelSpec` describes.

Each distinct prompt runs once (its ``G`` responses share it); its keys and values serve its
own causal attention and its responses' attention, in the same layer pass, so no prompt cache
is built and the gradient reaches the prompt's tokens as in a full forward. Norms, the MLPs'
and the output projections and the LM head are the model's own modules (so dtype handling
matches its ``forward`` exactly, float32 norms under float64 included); the fused query/key/value
and gate/up products, the gated activation (:func:`~dapo_rl.models.layer_ops.mlp_output`), per-head
q/k norms, rotary, sliding windows and soft-capped attention are written from the spec
(:mod:`dapo_rl.models.layer_ops`, :mod:`dapo_rl.models.rotary`). LoRA adapters: the module calls
include them (PEFT's layers), and the query/key/value products read each frozen base weight in
place and add the adapters' terms on the fly (:func:`~dapo_rl.models.layer_ops.qkv_output`): no
copy of the base per forward, no gradient of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dapo_rl.models import rotary as rope
from dapo_rl.models.layer_ops import head_norm, mlp_output, qkv_output, softcap, window_blocked
from dapo_rl.models.spec import read_spec

F = torch.nn.functional


@dataclass
class FlatPrompts:
    """The distinct prompts of a micro-batch: their real tokens in one flat order, prompt by prompt,
    and each token's slot in a right-padded ``[u, P]`` layout (``P`` the longest prompt)."""

    tokens: torch.Tensor  # [M] real prompt tokens
    positions: torch.Tensor  # [M] position id of each (0 … its prompt's length − 1)
    slots: torch.Tensor  # [M] slot in the [u · P] layout: prompt · P + position
    lengths: torch.Tensor  # [u] real length of each prompt
    last: torch.Tensor  # [u] flat index of each prompt's last token
    width: int  # P

    @classmethod
    def build(cls, prompt_ids: torch.Tensor, attention: torch.Tensor) -> "FlatPrompts":
        """From left-padded ``prompt_ids [u, P']`` and their ``attention [u, P']`` (1 on real tokens)."""
        real = attention.bool()
        lengths = real.sum(-1)
        positions = (real.long().cumsum(-1) - 1)[real]  # row-major: prompt by prompt, in order
        width = max(int(lengths.max()), 1)
        prompt = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)[:, None].expand_as(real)[real]
        return cls(tokens=prompt_ids[real], positions=positions, slots=prompt * width + positions, lengths=lengths,
                   last=lengths.cumsum(0) - 1, width=width)


@dataclass
class FlatResponses:
    """Where each real response token of a micro-batch sits, in one flat order.

    Rows are taken group by group (groups of similar length, see ``length_buckets`` in the
    trainer), each row's tokens contiguous and in order. Attention runs per group, padded only
    to the group's widest response: group ``i`` takes ``sizes[i] = g_i · W_i`` slots of one padded
    layout that holds every group, one after the other.
    """

    row_of: torch.Tensor  # [N] row of each token
    step_of: torch.Tensor  # [N] position of each token within its response
    positions: torch.Tensor  # [N] position id (the row's real prompt length + step)
    groups: list[tuple[torch.Tensor, int]]  # per group: its rows [g] and its width W
    slots: torch.Tensor  # [N] each token's slot in the padded layout of all groups
    sizes: list[int]  # per group, g · W

    @classmethod
    def build(cls, groups: list[list[int]], prompt_lengths: list[int], response_lengths: list[int],
              device: torch.device) -> "FlatResponses":
        row_of, step_of, layouts, slots, sizes = [], [], [], [], []
        for rows in groups:
            width = max(max(response_lengths[r] for r in rows), 1)
            offset = sum(sizes)
            for i, r in enumerate(rows):
                row_of += [r] * response_lengths[r]
                step_of += range(response_lengths[r])
                slots += range(offset + i * width, offset + i * width + response_lengths[r])
            sizes.append(len(rows) * width)
            layouts.append((torch.tensor(rows, device=device), width))
        row_t = torch.tensor(row_of, dtype=torch.long, device=device)
        step_t = torch.tensor(step_of, dtype=torch.long, device=device)
        return cls(row_of=row_t, step_of=step_t, positions=torch.tensor(prompt_lengths, device=device)[row_t] + step_t,
                   groups=layouts, slots=torch.tensor(slots, dtype=torch.long, device=device), sizes=sizes)


@dataclass
class AttentionLayout:
    """Where the flat ``[M + N]`` tokens go for attention: the padded layout of each block (the
    prompts' ``[u, P]``, then each length group's ``[g, W]``, whose keys and values are its
    prompt's ``P`` and its own ``W``), as gathers from the flat order.

    A padding slot gathers an arbitrary real token (flat index 0): as a key it is masked, and as a
    query its output is never read, so it adds exactly zero to every gradient.
    """

    blocks: list[tuple[int, int, int]]  # per block: rows, query width, key width
    query_map: torch.Tensor  # flat token of each query slot, block after block
    query_sizes: list[int]  # per block, rows · query width
    key_map: torch.Tensor  # flat token of each key/value slot, block after block
    key_sizes: list[int]  # per block, rows · key width
    token_slots: torch.Tensor  # [M + N] each flat token's query slot

    @classmethod
    def build(cls, prompts: FlatPrompts, flat: FlatResponses, owner: torch.Tensor) -> "AttentionLayout":
        u, width, m = prompts.lengths.numel(), prompts.width, prompts.tokens.numel()
        device = prompts.tokens.device
        prompt_grid = torch.zeros(u * width, dtype=torch.long, device=device)
        prompt_grid[prompts.slots] = torch.arange(m, device=device)
        response_grid = torch.zeros(sum(flat.sizes), dtype=torch.long, device=device)
        response_grid[flat.slots] = m + torch.arange(flat.slots.numel(), device=device)
        blocks, keys = [(u, width, width)], [prompt_grid]
        for (rows, w), part in zip(flat.groups, response_grid.split(flat.sizes)):
            blocks.append((rows.numel(), w, width + w))
            keys.append(torch.cat([prompt_grid.view(u, width)[owner[rows]], part.view(-1, w)], dim=1).flatten())
        return cls(blocks=blocks, query_map=torch.cat([prompt_grid, response_grid]), query_sizes=[u * width, *flat.sizes],
                   key_map=torch.cat(keys), key_sizes=[k.numel() for k in keys],
                   token_slots=torch.cat([prompts.slots, u * width + flat.slots]))


def score_mask(mask: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """An additive mask ``[g, 1, W, L]`` laid out as :func:`attention`'s scores,
    ``[g·kv_heads, rep·W, L]`` (``rep = heads / kv_heads``): built once, read by every layer."""
    g, _, width, length = mask.shape
    rep = heads // kv_heads
    return mask[:, None].expand(g, kv_heads, rep, width, length).reshape(g * kv_heads, rep * width, length)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              dropout: float = 0.0, cap: float | None = None) -> torch.Tensor:
    """Softmax attention written as two batched products, ``q [g, heads, W, d]`` over
    ``k, v [g, kv_heads, L, d]`` with an additive ``mask`` (:func:`score_mask`'s layout, or None)
    → ``[g, heads, W, d]``; scores soft-capped (``cap · tanh(s / cap)``, before the mask) when
    ``cap`` is given.

    Same result as ``F.scaled_dot_product_attention`` (grouped-query heads included: query head
    ``j`` reads key/value head ``j // (heads / kv_heads)``, as Hugging Face's ``repeat_kv``), but
    faster forward + backward on a CPU at the small per-group shapes of a response batch, where
    the fused kernel's per-call set-up dominates. Scale and mask enter the first product
    (``baddbmm``) unless soft-capping comes between them, or autocast would round the masked
    scores to its lower precision.
    """
    g, heads, width, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    queries = q.reshape(g * kv_heads, rep * width, d)
    keys = k.reshape(g * kv_heads, length, d).transpose(1, 2)
    if mask is not None and cap is None and mask.dtype == q.dtype and not torch.is_autocast_enabled(q.device.type):
        scores = torch.baddbmm(mask, queries, keys, alpha=scale)
    else:
        scores = softcap(torch.bmm(queries, keys) * scale, cap)  # [g·kv_heads, rep·W, L]
        if mask is not None:
            scores = scores + mask  # (under autocast: promoted to the mask's float32)
    scores = scores.softmax(-1)
    if dropout:
        scores = F.dropout(scores, dropout)
    return torch.bmm(scores, v.reshape(g * kv_heads, length, d)).view(g, heads, width, d)


def _blocked_to_mask(blocked: torch.Tensor, x: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Bool ``[g, q, k]`` (True = not attended) → additive mask in :func:`score_mask`'s layout."""
    return score_mask(x.new_zeros(blocked.shape).masked_fill_(blocked, float("-inf"))[:, None], heads, kv_heads)


def _block_masks(query_pos: torch.Tensor, prefix_pos: torch.Tensor, prefix_blocked: torch.Tensor, windows,
                 x: torch.Tensor, heads: int, kv_heads: int) -> dict:
    """Per window value (None = full attention), one block's mask: queries at positions
    ``query_pos [g, W]`` over a prefix of keys (``prefix_pos [g, P]``, ``prefix_blocked`` True on
    padding) and then the block's own ``W`` keys causally; keys more than a window behind blocked.
    Right padding needs no mask of its own: a real query never reaches the padded slots after it,
    and a padded query slot (its output never read) sees at least itself, so no row is all
    masked and no NaN reaches the backward pass."""
    g, width = query_pos.shape
    steps = torch.arange(width, device=x.device)
    blocked = torch.cat([prefix_blocked[:, None, :].expand(-1, width, -1),
                         (steps[None, :] > steps[:, None]).expand(g, -1, -1)], dim=-1)  # [g, W, P + W]
    key_pos = torch.cat([prefix_pos, query_pos], dim=-1)
    masks = {}
    for window in dict.fromkeys(windows):
        far = window_blocked(query_pos, key_pos, window)
        masks[window] = _blocked_to_mask(blocked if far is None else blocked | far, x, heads, kv_heads)
    return masks


def _attention_masks(prompts: FlatPrompts, flat: FlatResponses, owner: torch.Tensor, windows, x: torch.Tensor,
                     heads: int, kv_heads: int) -> list[dict]:
    """The masks of :class:`AttentionLayout`'s blocks (:func:`_block_masks`): the prompts causally
    over themselves, then each length group over its prompt's real tokens and itself."""
    u, device = prompts.lengths.numel(), x.device
    slots = torch.arange(prompts.width, device=device)
    none = torch.zeros((u, 0), dtype=torch.long, device=device)
    masks = [_block_masks(slots.expand(u, -1), none, none.bool(), windows, x, heads, kv_heads)]
    prompt_blocked = slots >= prompts.lengths[:, None]  # [u, P]
    for rows, width in flat.groups:
        own = owner[rows]
        query_pos = prompts.lengths[own][:, None] + torch.arange(width, device=device)  # [g, W]
        masks.append(_block_masks(query_pos, slots.expand(rows.numel(), -1), prompt_blocked[own], windows, x, heads, kv_heads))
    return masks


def flat_logits(model, prompts: FlatPrompts, owner: torch.Tensor, tokens: torch.Tensor, flat: FlatResponses,
                complex_rotary: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits after every real response token, and after each prompt's last token: the same
    computation as the model's ``forward`` over each prompt + response, up to summation order
    (differentiable).

    All ``M`` prompt and ``N`` response tokens go through the projections, MLPs, norms and LM
    head as one ``[M + N, hidden]`` batch (no padding, one matrix product per weight); only
    attention, a small share of the cost, runs on padded layouts (:func:`attention`): the prompts
    together on ``[u, heads, P, d]``, the responses per length group on ``[g, heads, W, d]``
    over their prompt's keys/values and their own. Dynamic/longrope RoPE: exact while the longest
    sequence is within ``spec.exact_up_to`` (see :func:`~dapo_rl.models.spec.supports_fast_path`
    with ``max_length``).

    Args:
        model: a model :func:`~dapo_rl.models.spec.supports_fast_path` accepts.
        prompts: the distinct prompts.
        owner: ``[rows]`` which distinct prompt each response continues.
        tokens: ``[N]`` the response tokens in ``flat`` order.
        flat: where each response token sits.
        complex_rotary: force rotary as a complex product (True) or Hugging Face's rotate-half
            form (False); None picks the complex product where it applies (float32/float64, no autocast).

    Returns:
        ``after [N, vocab]`` (entry j predicts the token after flat response token j) and
        ``last [u, vocab]`` (each prompt's next token: its response's first); final soft-capping applied.
    """
    spec = read_spec(model)
    inner = model.model
    m, n, u = prompts.tokens.numel(), tokens.numel(), prompts.lengths.numel()
    heads, kv_heads, d, rd = spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim
    x = inner.embed_tokens(torch.cat([prompts.tokens, tokens]))  # [M + N, hidden] (scaled, for Gemma)
    if complex_rotary is None:
        # Under autocast the products' outputs are bfloat16/float16, which have no complex type.
        complex_rotary = not torch.is_autocast_enabled(x.device.type) and all(
            rope.complex_rotary_applies(inner.rotary_emb, x.dtype, x.device, kind) for kind in spec.kinds)
    positions = torch.cat([prompts.positions, flat.positions])
    turns = []  # per rotary kind: complex [M + N, 1, r/2], or (cos, sin) [M + N, 1, r]
    for kind in spec.kinds:
        cos, sin = rope.rotary_cos_sin(inner.rotary_emb, x, positions, kind)
        cos, sin = cos[:, None], sin[:, None]
        turns.append(torch.complex(cos[..., : rd // 2], sin[..., : rd // 2]) if complex_rotary else (cos, sin))
    order = rope.rotary_order(d, rd).to(x.device) if complex_rotary else None
    # The rotary permutation goes into the query/key weight rows (no copy of activations). A
    # per-head RMSNorm commutes with permuting a head's dimensions when its scale is permuted
    # alike, so the q/k norms (Qwen3, Gemma3) run on the permuted order with a permuted scale.
    qk_rows = rope.qk_weight_rows(heads + kv_heads, d, x.device, rd) if complex_rotary else None
    layout = AttentionLayout.build(prompts, flat, owner)
    masks = _attention_masks(prompts, flat, owner, spec.windows, x, heads, kv_heads)
    kind_index = {kind: i for i, kind in enumerate(spec.kinds)}
    dropout = getattr(model.config, "attention_dropout", 0.0) if model.training else 0.0

    def decoder_layer(x: torch.Tensor, i: int) -> torch.Tensor:
        layer = inner.layers[i]
        attn = layer.self_attn
        qkv = qkv_output(spec, attn, qk_rows, layer.input_layernorm(x)).view(m + n, heads + 2 * kv_heads, d)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        if spec.qk_norm:
            q, k = head_norm(spec, attn.q_norm, q, order), head_norm(spec, attn.k_norm, k, order)
        turn = turns[kind_index[spec.rotary_kinds[i]]]
        if complex_rotary:
            q, k = rope.apply_rotary(q, turn), rope.apply_rotary(k, turn)
        else:
            q, k = rope.rotate_half_form(q, *turn), rope.rotate_half_form(k, *turn)
        # One gather per tensor into every block's padded layout (the prompts', then each length
        # group's, whose keys/values start with its prompt's); the backward pass is one scatter each.
        queries = q.index_select(0, layout.query_map).split(layout.query_sizes)
        keys = k.index_select(0, layout.key_map).split(layout.key_sizes)
        values = v.index_select(0, layout.key_map).split(layout.key_sizes)
        outs = []
        for (count, width_q, width_k), q_b, k_b, v_b, mask in zip(layout.blocks, queries, keys, values, masks):
            out = attention(q_b.view(count, width_q, heads, d).transpose(1, 2), k_b.view(count, width_k, kv_heads, d).transpose(1, 2),
                            v_b.view(count, width_k, kv_heads, d).transpose(1, 2), mask[spec.windows[i]], spec.scaling,
                            dropout=dropout, cap=spec.attn_softcap)  # [count, heads, width_q, d]
            outs.append(out.transpose(1, 2).reshape(count * width_q, heads * d))
        # Back from the padded layouts to flat order: one gather.
        o = attn.o_proj(torch.cat(outs).index_select(0, layout.token_slots))
        if spec.sandwich_norms:
            x = x + layer.post_attention_layernorm(o)
            return x + layer.post_feedforward_layernorm(mlp_output(spec, layer.mlp, layer.pre_feedforward_layernorm(x)))
        x = x + _resid_dropout(layer, "resid_attn_dropout", o)
        return x + _resid_dropout(layer, "resid_mlp_dropout", mlp_output(spec, layer.mlp, layer.post_attention_layernorm(x)))

    # Each layer's activations recomputed in the backward pass instead of kept (dropout replays its draws).
    recompute = recomputes_layers(model)
    for i in range(len(inner.layers)):
        x = checkpoint(decoder_layer, x, i, use_reentrant=False) if recompute else decoder_layer(x, i)
    # Only the prompts' last positions and the responses reach the head.
    logits = softcap(model.lm_head(inner.norm(torch.cat([x.index_select(0, prompts.last), x[m:]]))), spec.final_softcap)
    return logits[u:], logits[:u]


def recomputes_layers(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` now recomputes each layer in the backward pass: gradient
    checkpointing on (``model.gradient_checkpointing``, Hugging Face's
    ``gradient_checkpointing_enable``), training mode, gradients enabled."""
    return model.training and torch.is_grad_enabled() and bool(getattr(model, "is_gradient_checkpointing", False))


def _resid_dropout(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's dropout on each branch output (identity elsewhere and in eval mode)."""
    module = getattr(layer, name, None)
    return x if module is None else module(x)
