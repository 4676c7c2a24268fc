"""Decode steps of any model a :class:`~dapo_rl.models.spec.ModelSpec` describes, computed straight
from its weights (the sampling engine's inner loop, :mod:`dapo_rl.rollout.decoder_engine`).

Same arithmetic as the Hugging Face modules, minus the per-call overhead that dominates a small
model's decode step (mask building, cache bookkeeping, ~10 module calls per layer):

- Q/K/V and gate/up projections are fused into one matrix each (built per ``generate`` call,
  since training changes the weights), biases included; RMSNorm is ``F.rms_norm`` with the
  family's effective scale (Gemma's ``1 + w``); pre-norm residual additions are folded into the
  output products.
- A model with LoRA adapters is read in place instead (:class:`Projection`): its base never
  changes, so a fused or packed copy would only double the weights' memory, which is what LoRA
  is for. Each projection's own matrix gives one product, and the adapters' low-rank terms
  ``(x·Aᵀ)·((alpha / r)·B)ᵀ`` are added on the fly (one extra pair of thin products per fused
  projection); the base stays bit-exact.
- On a CPU, float32 weights are reordered once per call into oneDNN's blocked layout and the
  products run on oneDNN: a decode step has few rows, and MKL's ``sgemm`` re-packs the whole
  weight matrix on every call. Same float32 arithmetic up to summation order.
- Rotary for float32/float64 models is one in-place complex product: the rows of ``W_q``/``W_k``
  are permuted per head (:func:`~dapo_rl.models.rotary.rotary_order`) so each rotated pair is
  adjacent; per-head q/k norm scales are permuted alike. Cached keys are stored permuted. Other
  dtypes use Hugging Face's ``x·cos + rotate_half(x)·sin``. Angles come from tables computed once
  per call by the model's own rotary module (one per rotary kind: Gemma3's local and global).
- On a CPU in float32 with the complex rotary, RMSNorm, q/k norm + rotary + cache write, and
  attention (windows and soft-capping included) run as fused C loops (:mod:`dapo_rl.models.native`).
- All layers' keys and values live in one buffer ``[layers, rows, 2·kv_heads, capacity, d]``,
  written in place, never evicted: a sliding-window layer reads only its last ``window`` positions.
- Prompts of equal length need no attention mask; otherwise an additive mask (0 / −inf on the
  prompt's padding) is built once and sliced.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from dapo_rl.models import native
from dapo_rl.models import rotary as rope
from dapo_rl.models.layer_ops import (activation, gate_up_modules, gate_up_params, norm_scale, qkv_columns, qkv_modules, qkv_params,
                                   softcap)
from dapo_rl.models.lora import adapters_active, effective_weight, low_rank_factors
from dapo_rl.models.native import cpu_info
from dapo_rl.models.spec import ModelSpec

F = torch.nn.functional


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` reordered into oneDNN's blocked layout for :meth:`SpecDecoder.linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def can_pack(weight: torch.Tensor) -> bool:
    """Whether decode products can run on oneDNN with pre-packed weights: float32 or bfloat16 on a
    CPU whose PyTorch build has oneDNN (and, for bfloat16, runs its bf16 linear)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and _onednn_linear_works(weight.dtype))


PLAIN_PRODUCTS_MAX_HIDDEN = 256  # see packs_by_default


def packs_by_default(hidden: int, device: torch.device) -> bool:
    """Whether decode products run on oneDNN with packed weights when the caller does not say.

    Yes on a CPU, except for models of hidden size ≤ ``PLAIN_PRODUCTS_MAX_HIDDEN`` on an Intel
    CPU: there MKL's plain ``F.linear`` is at least as fast at every row count, so oneDNN's fixed
    cost per call (and per packed weight, per ``generate``) buys nothing for such small products.
    On other CPUs MKL's plain products at decode shapes fall behind oneDNN's, so oneDNN stays
    (the measurements behind both rules: ``benchmarks/RESULTS.md``). A function of the model and
    the machine only, never of a timing, so a run's products (and samples) are the same every
    time it runs on that machine.
    """
    if not (device.type == "cpu" and _onednn_linear_works()):
        return False
    return not (hidden <= PLAIN_PRODUCTS_MAX_HIDDEN and cpu_vendor() == "GenuineIntel")


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, …), or "" where unknown."""
    return cpu_info("vendor_id")


@functools.cache
def _onednn_linear_works(dtype: torch.dtype = torch.float32) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ones(2, 3, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3, dtype=dtype), pack(probe), None, "none", [], "")
        return out.shape == (1, 2) and bool((out == 3).all())
    except (AttributeError, RuntimeError):  # an older build without these operators
        return False


class Projection:
    """One decode product ``x [rows, in]`` → ``x·Wᵀ + b [rows, out]`` (``+ residual`` when given).

    Either one matrix the decoder owns (:meth:`copied`: parts fused, packed for oneDNN when
    ``packed``), one product per call; or the model's own matrices read where they lie
    (:meth:`in_place`): one product per part, the parts' outputs side by side, plus the LoRA
    adapters' term ``(x·Aᵀ)·Bᵀ`` of all parts in two thin products (``A`` of every adapter
    stacked ``[R, in]``, ``B`` block-diagonal ``[out, R]``, scale folded in), then ``columns``
    reorders the output (the queries'/keys' rotary order).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], packed: bool = False,
                 low_rank: tuple[torch.Tensor, torch.Tensor] | None = None, columns: torch.Tensor | None = None):
        self.weights, self.biases, self.packed = weights, biases, packed
        self.low_rank, self.columns = low_rank, columns
        self.single = len(weights) == 1 and low_rank is None and columns is None

    @classmethod
    def copied(cls, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, dtype: torch.dtype | None = None) -> "Projection":
        """A product on the decoder's own ``weight [out, in]`` (packed for oneDNN when ``packed``;
        cast to ``dtype`` when given, bias included)."""
        weight = weight.detach() if dtype is None else weight.detach().to(dtype)
        bias = None if bias is None else (bias.detach() if dtype is None else bias.detach().to(dtype))
        return cls([pack(weight) if packed else weight], [bias], packed)

    @classmethod
    def in_place(cls, modules: list, columns: torch.Tensor | None = None) -> "Projection":
        """The products of ``modules`` (``nn.Linear`` or PEFT's ``lora.Linear``), outputs stacked in
        order, read in place; their active adapters computed on the fly."""
        weights = [m.weight.detach() for m in modules]
        biases = [None if m.bias is None else m.bias.detach() for m in modules]
        blocks, offset = [], 0  # (first output row, A, scaled B) of every adapter
        for module, weight in zip(modules, weights):
            blocks += [(offset, a, b) for a, b in low_rank_factors(module)]
            offset += weight.shape[0]
        low_rank = None
        if blocks:
            a = torch.cat([a for _, a, _ in blocks])  # [R, in]
            b = a.new_zeros((offset, a.shape[0]))  # [out, R]
            rank = 0
            for first, a_i, b_i in blocks:
                b[first : first + b_i.shape[0], rank : rank + a_i.shape[0]] = b_i
                rank += a_i.shape[0]
            low_rank = (a, b)
        return cls(weights, biases, low_rank=low_rank, columns=columns)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.single:
            weight, bias = self.weights[0], self.biases[0]
            if self.packed:
                if residual is None:
                    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
            if residual is None:
                return F.linear(x, weight, bias)
            out = torch.addmm(residual, x, weight.t())
            return out if bias is None else out.add_(bias)
        outs = [F.linear(x, weight, bias) for weight, bias in zip(self.weights, self.biases)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.low_rank is not None:
            a, b = self.low_rank
            out.addmm_(F.linear(x, a), b.t())
        if self.columns is not None:
            out = out.index_select(-1, self.columns)
        return out if residual is None else out.add_(residual)


@dataclass
class DecodeLayer:
    """One layer's weights as the decode step uses them (its four products; norm scales
    effective, ``(scale, eps)``)."""

    attn_norm: tuple[torch.Tensor, float]
    qkv: Projection  # output columns: queries and keys in the rotary (cached) order, then values
    q_norm: tuple[torch.Tensor, float] | None  # per head, in the cached (permuted) order
    k_norm: tuple[torch.Tensor, float] | None
    o: Projection
    post_attn_norm: tuple[torch.Tensor, float] | None  # Gemma: on the attention output
    mlp_norm: tuple[torch.Tensor, float]
    gate_up: Projection
    down: Projection
    post_mlp_norm: tuple[torch.Tensor, float] | None  # Gemma: on the MLP output
    window: int | None
    kind: int  # index of its rotary table


class SpecDecoder:
    """Decode steps from a model's weights, as its :class:`ModelSpec` describes them.

    Args:
        model: the Hugging Face causal LM (weights read, never copied except when fused/packed).
        spec: its spec (:func:`~dapo_rl.models.spec.fast_spec`).
        pack_weights: products on oneDNN with packed weights (CPU float32 only); None: as
            :func:`packs_by_default` decides for this model and machine. Not for weights read in place.
        native_kernels: fused C loops for norms, rotary, attention and the gated MLP activation (CPU float32, complex rotary).
        in_place: read the model's matrices where they lie, adapters on the fly (no fused, packed
            or merged copy; see :class:`Projection`); None: when the model has active LoRA adapters.
        dtype: the dtype of the decoder's copies of the weights, its activations and its key/value
            cache (``torch.bfloat16`` for bf16 sampling); None: the model's own. The last norm and
            the output product stay in the model's dtype, so logits (and the log-probs sampled
            from them) are computed in float32 from the last hidden state. Not with ``in_place``.
    """

    def __init__(self, model, spec: ModelSpec, pack_weights: bool | None = None, native_kernels: bool = True,
                 in_place: bool | None = None, dtype: torch.dtype | None = None):
        inner = model.model
        self.spec = spec
        model_dtype = inner.embed_tokens.weight.dtype
        cast = None if dtype in (None, model_dtype) else dtype
        self.in_place = adapters_active(model) if in_place is None else in_place
        if cast is not None and self.in_place:
            raise ValueError(f"a decoder that reads the weights in place (LoRA) samples in the model's dtype ({model_dtype}), "
                             f"not {dtype}")
        self.embed = inner.embed_tokens.weight.detach()
        if cast is not None:
            self.embed = self.embed.to(cast)
        self.embed_scale = inner.embed_tokens.embed_scale.to(self.embed.dtype) if spec.embed_scale else None
        self.rotary = inner.rotary_emb
        self.heads, self.kv_heads, self.head_dim, self.rotary_dim = spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim
        self.scaling, self.hidden = spec.scaling, spec.hidden
        self.act = activation(spec)
        if pack_weights is None:
            pack_weights = packs_by_default(spec.hidden, self.embed.device)
        self.packed = pack_weights and can_pack(self.embed) and not self.in_place
        self.cast = cast
        device, dtype = self.embed.device, self.embed.dtype
        self.dtype = dtype
        self.complex_rotary = all(rope.complex_rotary_applies(self.rotary, dtype, device, kind) for kind in spec.kinds)
        use_kernels = native_kernels and self.complex_rotary and device.type == "cpu" and dtype == torch.float32
        self.kernels = native.native_kernels() if use_kernels else None
        order = rope.rotary_order(self.head_dim, self.rotary_dim).to(device) if self.complex_rotary else None
        self.key_order = order
        qk_rows = rope.qk_weight_rows(self.heads + self.kv_heads, self.head_dim, device, self.rotary_dim) if self.complex_rotary else None
        upcast = dtype not in (torch.float32, torch.float64)
        scale = lambda norm, o=None: tuple(t.detach() if torch.is_tensor(t) else t for t in norm_scale(spec, norm, o, upcast))  # noqa: E731
        kind_index = {kind: i for i, kind in enumerate(spec.kinds)}
        with torch.no_grad():
            if cast is None:
                self.lm_head = self._products(model.lm_head)
            else:  # logits from the model's own output weights, in its dtype
                head = effective_weight(model.lm_head)
                self.lm_head = Projection.copied(head, model.lm_head.bias, packed=bool(pack_weights) and can_pack(head))
            self.norm = scale(inner.norm)
            self.layers = []
            for i, layer in enumerate(inner.layers):
                a, m = layer.self_attn, layer.mlp
                sandwich = spec.sandwich_norms
                self.layers.append(DecodeLayer(
                    attn_norm=scale(layer.input_layernorm), qkv=self._qkv_products(a, qk_rows),
                    q_norm=scale(a.q_norm, order) if spec.qk_norm else None,
                    k_norm=scale(a.k_norm, order) if spec.qk_norm else None,
                    o=self._products(a.o_proj),
                    post_attn_norm=scale(layer.post_attention_layernorm) if sandwich else None,
                    mlp_norm=scale(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm),
                    gate_up=self._products(gate_up_modules(spec, m),
                                           gate_up_params(spec, m, merged=True) if not self.in_place else None),
                    down=self._products(m.down_proj),
                    post_mlp_norm=scale(layer.post_feedforward_layernorm) if sandwich else None,
                    window=spec.windows[i], kind=kind_index[spec.rotary_kinds[i]],
                ))
        self.kv: torch.Tensor | None = None
        self.rows = 0
        self.length = 0
        self.mask: torch.Tensor | None = None

    def _products(self, modules, fused: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Projection:
        """The :class:`Projection` of one module (or of ``modules`` stacked): read in place, or the
        decoder's own copy (``fused``: the stacked ``(weight, bias)`` when there are several; a
        module's weight with its adapters merged in, :func:`effective_weight`, when there is one)."""
        modules = modules if isinstance(modules, list) else [modules]
        if self.in_place:
            return Projection.in_place(modules)
        if fused is None:
            (module,) = modules
            fused = effective_weight(module), module.bias
        return Projection.copied(*fused, packed=self.packed, dtype=self.cast)

    def _qkv_products(self, attn, qk_rows: torch.Tensor | None) -> Projection:
        """Queries, keys and values in one product, queries/keys rows in ``qk_rows``' order."""
        spec = self.spec
        if not self.in_place:
            return Projection.copied(*qkv_params(spec, attn, qk_rows, merged=True), packed=self.packed, dtype=self.cast)
        return Projection.in_place(qkv_modules(spec, attn), None if qk_rows is None else qkv_columns(spec, qk_rows))

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) · up`` of the gate/up product ``[rows, 2·I]`` → ``[rows, I]``."""
        gate, up = gate_up.chunk(2, dim=-1)
        if self.kernels is not None and self.spec.activation in self.kernels.GATED_ACTIVATIONS:
            return self.kernels.gated(gate, up, self.spec.activation)
        return self.act(gate).mul_(up)

    def rms_norm(self, x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        """RMSNorm of ``x [..., n]`` over its last dimension with ``norm = (scale [n], eps)``."""
        if self.kernels is not None:
            return self.kernels.rms_norm(x, *norm)
        scale, eps = norm
        if scale.dtype != x.dtype:  # bfloat16/float16 activations: normalised and scaled in float32, as HF's RMSNorms do
            return (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * scale).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), scale, eps)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last RMSNorm of ``x [rows, hidden]``, in the output product's dtype (float32 when the
        decoder computes in bfloat16: logits come from the unrounded normalised state)."""
        if self.cast is None:
            return self.rms_norm(x, self.norm)
        scale, eps = self.norm
        return F.rms_norm(x.to(scale.dtype), (x.shape[-1],), scale, eps)

    def start(self, prefill_cache: Cache, repeats: int, attention: torch.Tensor, capacity: int) -> None:
        """Copy the prefilled ``[b, kv_heads, P, d]`` keys/values (all positions: a cache that does
        not evict) into the buffer, each row ``repeats`` times. ``attention``: the prompts'
        ``[b, P]`` 0/1 mask (left padding = 0)."""
        first = prefill_cache.layers[0].keys
        b, kv_heads, width, d = first.shape
        rows = b * repeats
        self.kv = first.new_empty((len(self.layers), rows, 2 * kv_heads, capacity, d), dtype=self.dtype)
        for i, layer in enumerate(prefill_cache.layers):
            keys = layer.keys if self.key_order is None else layer.keys[..., self.key_order]
            self.kv[i, :, :kv_heads, :width] = keys.repeat_interleave(repeats, dim=0)
            self.kv[i, :, kv_heads:, :width] = layer.values.repeat_interleave(repeats, dim=0)
        self.rows, self.length = rows, width
        if bool(attention.all()):
            self.mask = None  # no padding: every cached position is attended to
        else:
            mask = first.new_zeros((rows, 1, 1, capacity), dtype=self.dtype)
            mask[:, 0, 0, :width].masked_fill_(attention.repeat_interleave(repeats, dim=0) == 0, float("-inf"))
            self.mask = mask

    def hide(self, rows: torch.Tensor) -> None:
        """The keys/values the next call writes for ``rows`` are never attended to (by any later
        step): a multi-turn row that waits for its tool is computed with the others, but ignored."""
        if rows.numel() == 0:
            return
        if self.mask is None:
            self.mask = self.kv.new_zeros((self.kv.shape[1], 1, 1, self.kv.shape[3]))
        self.mask[rows, 0, 0, self.length] = float("-inf")

    def finish(self) -> None:
        """Free this call's key/value buffer and mask (the weights stay, for another :meth:`start`)."""
        self.kv, self.mask, self.rows, self.length = None, None, 0, 0

    def rotary_tables(self, capacity: int, device) -> list[torch.Tensor]:
        """Per rotary kind, the rotation of every position ``0 … capacity−1`` (see :meth:`rotary_at`),
        from the model's rotary module in one call (dynamic/longrope: exact while ``capacity`` is
        within ``spec.exact_up_to``, which the engine checks)."""
        positions = torch.arange(capacity, device=device)
        return [self._rotation(positions, kind) for kind in self.spec.kinds]

    def _rotation(self, positions: torch.Tensor, kind) -> torch.Tensor:
        cos, sin = rope.rotary_cos_sin(self.rotary, self.embed[:1][None], positions, kind)  # [n, r], halves repeated
        half = cos.shape[-1] // 2
        if self.complex_rotary:
            return torch.complex(cos[:, :half], sin[:, :half])  # [n, r/2] e^{iθ}
        sin = sin.clone()
        sin[:, :half].neg_()
        return torch.stack([cos, sin], dim=1)  # [n, 2, r] (cos, sin')

    def rotary_at(self, tables: list[torch.Tensor], positions: torch.Tensor) -> list[torch.Tensor]:
        """Per rotary kind, the rotation at ``positions [rows]``: ``[rows, 1, r/2]`` complex
        ``e^{iθ}`` (complex rotary), else ``[rows, 2, r]`` (cos, sin with its first half negated)."""
        picked = [table.index_select(0, positions) for table in tables]
        return [p[:, None] for p in picked] if self.complex_rotary else picked

    def drop_rows(self, finished: torch.Tensor, carried: list[torch.Tensor]) -> list[torch.Tensor]:
        """Remove decode rows ``finished`` (ascending indices) from the batch.

        The ``m`` surviving rows end up in rows ``0 … m−1``: each finished row below ``m`` is
        overwritten by a surviving row from ``m`` or above (the only rows that move), keys and
        values of all layers in one copy. Rows of each tensor in ``carried`` (``[rows, …]``)
        are moved the same way; returns them cut to ``m`` rows.
        """
        rows = self.rows
        m = rows - finished.numel()
        holes = finished[finished < m]
        if holes.numel():
            keep = torch.ones(rows, dtype=torch.bool, device=finished.device)
            keep[finished] = False
            movers = keep[m:].nonzero().squeeze(-1) + m  # as many as holes, ascending
            self.kv[:, holes, :, : self.length] = self.kv[:, movers, :, : self.length]
            if self.mask is not None:
                self.mask[holes] = self.mask[movers]
            for tensor in carried:
                tensor[holes] = tensor[movers]
        self.rows = m
        return [tensor[:m] for tensor in carried]

    def __call__(self, tokens: torch.Tensor, rotations: list[torch.Tensor]) -> torch.Tensor:
        """``tokens [rows]`` at the next position, turned by ``rotations`` (:meth:`rotary_at`) →
        logits ``[rows, V]``; appends their keys/values."""
        rows, pos, length = tokens.shape[0], self.length, self.length + 1
        x = F.embedding(tokens, self.embed)  # [rows, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        d, heads = self.head_dim, self.heads
        kernel_mask = self.mask[:, 0, 0] if self.kernels is not None and self.mask is not None else None  # [rows, capacity]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self.rms_norm(x, layer.attn_norm)).view(rows, -1, d)
            first = 0 if layer.window is None else max(0, length - layer.window)  # oldest position in the window
            if self.kernels is not None:
                self.kernels.rotary_append(qkv, rotations[layer.kind], self.kv[i], heads, pos, layer.q_norm, layer.k_norm)
                out = self.kernels.attention(qkv, self.kv[i], kernel_mask, heads, length, self.scaling, first, self.spec.attn_softcap)
            else:
                self._rotate_append(qkv, rotations[layer.kind], i, pos, layer)
                out = self._attention(qkv, i, rows, first, length)
            if layer.post_attn_norm is None:
                x = layer.o(out, residual=x)
            else:
                x = x + self.rms_norm(layer.o(out), layer.post_attn_norm)
            hidden = self._gated(layer.gate_up(self.rms_norm(x, layer.mlp_norm)))
            if layer.post_mlp_norm is None:
                x = layer.down(hidden, residual=x)
            else:
                x = x + self.rms_norm(layer.down(hidden), layer.post_mlp_norm)
        self.length = length
        return softcap(self.lm_head(self.final_norm(x)), self.spec.final_softcap)

    def _rotate_append(self, qkv: torch.Tensor, rotation: torch.Tensor, i: int, pos: int, layer: DecodeLayer) -> None:
        """PyTorch ops: per-head q/k norms, rotary (in place) and the cache write of layer ``i``."""
        heads, kv_heads, r = self.heads, self.kv_heads, self.rotary_dim
        if layer.q_norm is not None:
            qkv[:, :heads] = self.rms_norm(qkv[:, :heads], layer.q_norm)
            qkv[:, heads : heads + kv_heads] = self.rms_norm(qkv[:, heads : heads + kv_heads], layer.k_norm)
        qk = qkv[:, : heads + kv_heads, :r]
        if self.complex_rotary:  # in place (inference): rotate_pairs without the copy
            torch.view_as_complex(qk.unflatten(-1, (r // 2, 2))).mul_(rotation)
        else:
            qk.copy_((qk * rotation[:, 0:1]).add_(qk.roll(r // 2, dims=-1).mul_(rotation[:, 1:2])))
        self.kv[i, : qkv.shape[0], :, pos] = qkv[:, heads:]  # this step's keys and values

    def _attention(self, qkv: torch.Tensor, i: int, rows: int, first: int, length: int) -> torch.Tensor:
        """PyTorch ops: attention of this step's queries over cached positions ``first … length−1``
        of layer ``i`` → ``[rows, heads·d]``."""
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        cache = self.kv[i, :rows, :, first:length]
        mask = self.mask[:rows, :, :, first:length] if self.mask is not None else None
        q = qkv[:, :heads, None]  # [rows, heads, 1, d]
        cap = self.spec.attn_softcap
        if cap is None:
            out = F.scaled_dot_product_attention(q, cache[:, :kv_heads], cache[:, kv_heads:], attn_mask=mask,
                                                 scale=self.scaling, enable_gqa=kv_heads != heads)
            return out.reshape(rows, heads * d)
        rep = heads // kv_heads
        scores = softcap(torch.matmul(q.reshape(rows, kv_heads, rep, d), cache[:, :kv_heads].transpose(-1, -2)) * self.scaling, cap)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(scores.softmax(-1), cache[:, kv_heads:]).reshape(rows, heads * d)
