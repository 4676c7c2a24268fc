"""Pieces of a decoder layer both fast paths share, written once from a :class:`~dapo_rl.models.spec.ModelSpec`:
the fused query/key/value product, the fused gate/up product, norm scales, the MLP activation,
soft-capping and sliding-window masks. All differentiable (the trainer builds them per forward,
since the optimiser changes the weights)."""

from __future__ import annotations

import functools

import torch

from dapo_rl.models.lora import effective_weight, lora_output
from dapo_rl.models.native import NativeKernels, native_kernels
from dapo_rl.models.spec import ModelSpec

F = torch.nn.functional


def qkv_params(spec: ModelSpec, attn, qk_rows: torch.Tensor | None, merged: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[W_q; W_k; W_v]`` ``[(heads + 2·kv_heads)·d, hidden]`` and its bias (or None), the
    query/key rows reordered by ``qk_rows`` (:func:`~dapo_rl.models.rotary.qk_weight_rows`) when
    given. Phi-3's ``qkv_proj`` already stacks them in this order. LoRA-adapted projections give
    their base weight, or with ``merged`` the base plus the adapters (:func:`~dapo_rl.models.lora.effective_weight`)."""
    weight_of = effective_weight if merged else (lambda m: m.weight)
    if spec.fused_qkv:
        weight, bias = weight_of(attn.qkv_proj), attn.qkv_proj.bias
        if qk_rows is None:
            return weight, bias
        qk = (spec.heads + spec.kv_heads) * spec.head_dim
        return (torch.cat([weight.index_select(0, qk_rows), weight[qk:]]),
                None if bias is None else torch.cat([bias.index_select(0, qk_rows), bias[qk:]]))
    qk = torch.cat([weight_of(attn.q_proj), weight_of(attn.k_proj)])
    weight = torch.cat([qk if qk_rows is None else qk.index_select(0, qk_rows), weight_of(attn.v_proj)])
    if not spec.qkv_bias:
        return weight, None
    qk_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias])
    return weight, torch.cat([qk_b if qk_rows is None else qk_b.index_select(0, qk_rows), attn.v_proj.bias])


def qkv_modules(spec: ModelSpec, attn) -> list:
    """The attention's query/key/value projection modules, in output order: Phi-3's one
    ``qkv_proj``, else ``q_proj``, ``k_proj``, ``v_proj``."""
    return [attn.qkv_proj] if spec.fused_qkv else [attn.q_proj, attn.k_proj, attn.v_proj]


def qkv_columns(spec: ModelSpec, qk_rows: torch.Tensor) -> torch.Tensor:
    """``[(heads + 2·kv_heads)·d]`` the column order that puts a stacked query/key/value output's
    query/key columns in ``qk_rows``' order (values unchanged)."""
    qk, total = (spec.heads + spec.kv_heads) * spec.head_dim, (spec.heads + 2 * spec.kv_heads) * spec.head_dim
    return torch.cat([qk_rows, torch.arange(qk, total, device=qk_rows.device)])


def qkv_output(spec: ModelSpec, attn, qk_rows: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Queries, keys and values of ``x [N, hidden]`` → ``[N, (heads + 2·kv_heads)·d]``, the query/key
    columns in ``qk_rows``' order when given (differentiable).

    One product on the fused :func:`qkv_params` weight; for LoRA-adapted projections, one product
    per projection on its frozen base weight read in place (a fused copy would be a per-forward
    copy of the base, kept for the backward pass), plus each active adapter's term on the fly, so
    no gradient of a frozen base is formed.
    """
    parts = qkv_modules(spec, attn)
    if not any(hasattr(module, "base_layer") for module in parts):
        weight, bias = qkv_params(spec, attn, qk_rows)
        return F.linear(x, weight, bias)
    outs = []
    for module in parts:
        out, adapted = F.linear(x, module.weight, module.bias), lora_output(module, x)
        outs.append(out if adapted is None else out + adapted)
    out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
    return out if qk_rows is None else out.index_select(1, qkv_columns(spec, qk_rows))


def gate_up_params(spec: ModelSpec, mlp, merged: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[W_gate; W_up]`` ``[2·intermediate, hidden]`` and its bias (or None); ``merged`` as for :func:`qkv_params`."""
    weight_of = effective_weight if merged else (lambda m: m.weight)
    if spec.fused_gate_up:
        return weight_of(mlp.gate_up_proj), mlp.gate_up_proj.bias
    weight = torch.cat([weight_of(mlp.gate_proj), weight_of(mlp.up_proj)])
    return weight, (torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if spec.mlp_bias else None)


def gate_up_modules(spec: ModelSpec, mlp) -> list:
    """The MLP's gate/up projection modules, in output order: Phi-3's one ``gate_up_proj``, else
    ``gate_proj``, ``up_proj``."""
    return [mlp.gate_up_proj] if spec.fused_gate_up else [mlp.gate_proj, mlp.up_proj]


class _GatedActivation(torch.autograd.Function):
    """``act(gate) · up`` in one pass each way (the C kernel)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kernels, name: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.kernels, ctx.name = kernels, name
        return kernels.gated(gate, up, name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return (*ctx.kernels.gated_backward(grad.contiguous(), gate, up, ctx.name), None, None)


def gated(spec: ModelSpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) · up`` of ``gate, up [N, I]`` with the model's activation → ``[N, I]``
    (differentiable). One fused C pass forward and one backward on CPU float32 for SiLU and
    GeLU-tanh (:mod:`dapo_rl.models.native`, unless unavailable); PyTorch ops otherwise (other
    dtypes and devices, autocast, other activations), the same numbers to rounding."""
    if (gate.device.type == "cpu" and gate.dtype == up.dtype == torch.float32 and gate.dim() == 2
            and gate.stride(1) == up.stride(1) == 1 and spec.activation in NativeKernels.GATED_ACTIVATIONS
            and not torch.is_autocast_enabled("cpu")):
        kernels = native_kernels()
        if kernels is not None:
            return _GatedActivation.apply(gate, up, kernels, spec.activation)
    return activation(spec)(gate) * up


def mlp_output(spec: ModelSpec, mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP of ``x [N, hidden]`` → ``[N, hidden]``: ``down(act(gate(x)) · up(x))``, the projections
    the model's own modules (LoRA adapters included; Phi-3's one ``gate_up_proj`` split in halves),
    the gated activation :func:`gated` (differentiable)."""
    if spec.fused_gate_up:
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return mlp.down_proj(gated(spec, gate, up))


def norm_scale(spec: ModelSpec, norm, order: torch.Tensor | None = None, upcast: bool = False) -> tuple[torch.Tensor, float]:
    """An RMSNorm module's effective scale ``[n]`` (Gemma's ``1 + w``; reordered by ``order`` when
    given, for per-head norms on permuted queries/keys) and its epsilon. ``upcast``: Gemma's
    ``1 + w`` in float32, as its norm computes it (in bfloat16 the sum would lose ``w``'s low bits)."""
    weight = norm.weight if order is None else norm.weight.index_select(0, order)  # backward: no accumulating index_put
    eps = getattr(norm, "variance_epsilon", None)
    eps = norm.eps if eps is None else eps
    if spec.norm_offset:
        weight = (weight.float() if upcast else weight) + spec.norm_offset
    return weight, float(eps)


def head_norm(spec: ModelSpec, norm, x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """A per-head RMSNorm module (Qwen3's, Gemma3's ``q_norm``/``k_norm``) applied to ``x [..., d]``
    (differentiable). ``order [d]``: ``x``'s head dimensions are in this order (the rotary pairs'
    order, :func:`~dapo_rl.models.rotary.rotary_order`), so the scale is read in it too; the mean
    of squares does not depend on the order, so this equals the module on Hugging Face's order,
    permuted, up to summation order. None: the module itself."""
    if order is None:
        return norm(x)
    scale, eps = norm_scale(spec, norm, order)
    return F.rms_norm(x, (x.shape[-1],), scale, eps)


def activation(spec: ModelSpec):
    """The MLP's gate activation as a function of one tensor (same arithmetic as the model's module)."""
    if spec.activation == "silu":
        return F.silu
    if spec.activation == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh")
    return F.gelu


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap · tanh(x / cap)`` in Hugging Face's order of operations (x unchanged when cap is None)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def window_blocked(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Bool ``[…, q, k]``: key too far behind the query for a sliding window of ``window`` keys
    (Hugging Face's rule: a query at position p sees keys at positions > p − window); None when
    the layer attends everything. ``query_pos [..., q]``, ``key_pos [..., k]``."""
    if window is None:
        return None
    return (query_pos[..., :, None] - key_pos[..., None, :]) >= window
