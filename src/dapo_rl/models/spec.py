"""The architecture spec: what varies inside the Llama-like family, read from a model's config and
weights, so that one decoder (:mod:`dapo_rl.models.decode` for sampling steps,
:mod:`dapo_rl.models.packed_forward` for the trainer's unpadded forward) serves every family.

Supported families (``config.model_type``): ``llama``, ``mistral``, ``qwen2``, ``qwen3``,
``phi3``, ``gemma2``, ``gemma3_text``. Anything else, and the cases listed under
:func:`fast_spec`, run through the Hugging Face modules, announced once in one line.

A config that names a supported family but whose weights do not have the tensors that family
computes with (say a Qwen3 without ``q_norm``) raises :class:`SpecMismatchError` naming the
tensor: the fast paths never run with wrong math, and neither should the fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class SpecMismatchError(ValueError):
    """The model's config names a supported family but its weights do not match that family's
    spec (a tensor is missing, unexpected, or has the wrong shape). The message is one line
    naming the tensor."""


@dataclass(frozen=True)
class _Family:
    """How a supported family differs from Llama (fixed per ``model_type``)."""

    name: str
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before rotary (Qwen3, Gemma3)
    fused: bool = False  # qkv_proj and gate_up_proj (Phi-3)
    gemma: bool = False  # (1 + w) norms, sandwich norms, scaled embeddings, soft-capping
    windows: str = "none"  # "none" | "uniform" (config.sliding_window on every layer) | "layer_types"
    rotary_per_layer_type: bool = False  # rotary module called with the layer type (Gemma3)
    partial_rotary: bool = False  # its attention turns only the first dims cos/sin cover (Phi-3)
    qkv_bias: str | bool = "attention_bias"  # config flag, or fixed
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = False
    activation_key: str = "hidden_act"


FAMILIES = {
    "llama": _Family("Llama", mlp_bias="mlp_bias"),
    "mistral": _Family("Mistral", windows="uniform", qkv_bias=False, o_bias=False),
    "qwen2": _Family("Qwen2", windows="layer_types", qkv_bias=True, o_bias=False),
    "qwen3": _Family("Qwen3", qk_norm=True, windows="layer_types"),
    "phi3": _Family("Phi-3", fused=True, windows="uniform", partial_rotary=True, qkv_bias=False, o_bias=False),
    "gemma2": _Family("Gemma2", gemma=True, windows="layer_types", activation_key="hidden_activation"),
    "gemma3_text": _Family("Gemma3", gemma=True, qk_norm=True, windows="layer_types", rotary_per_layer_type=True,
                           activation_key="hidden_activation"),
}

# Why some well-known architectures have no spec (the one-line notice names it).
KNOWN_UNSUPPORTED = {
    "gemma3n": "per-layer embeddings",
    "gemma3": "the multimodal Gemma3 wrapper (load the text model with Gemma3ForCausalLM)",
    "gemma": "Gemma 1 (not in the supported family list)",
    "phi": "parallel attention/MLP blocks with LayerNorm",
    "olmo2": "norms after attention/MLP without pre-norms",
    "mixtral": "mixture-of-experts MLP",
    "qwen2_moe": "mixture-of-experts MLP",
    "qwen3_moe": "mixture-of-experts MLP",
}

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the fast decoder needs to know about a model's architecture.

    Shapes: ``hidden`` model width; ``heads``/``kv_heads`` query and key/value heads (GQA when
    they differ); ``head_dim`` per head (need not be hidden/heads); ``rotary_dim`` the leading
    dims of each head that rotary turns (< head_dim for Phi-3's ``partial_rotary_factor``).
    """

    family: str  # config.model_type
    name: str  # display name ("Qwen3")
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    scaling: float  # attention score multiplier (head_dim^-0.5, Gemma: query_pre_attn_scalar^-0.5)
    qkv_bias: bool  # q/k/v projections have biases (Qwen2; attention_bias elsewhere)
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm over head_dim on queries and keys, before rotary
    fused_qkv: bool  # one qkv_proj [(heads + 2·kv_heads)·d, hidden] (Phi-3)
    fused_gate_up: bool  # one gate_up_proj [2·intermediate, hidden], gate rows first (Phi-3)
    norm_offset: float  # RMSNorm scale is offset + weight (Gemma 1.0, else 0.0)
    sandwich_norms: bool  # post_attention_layernorm on the attention output, pre/post_feedforward_layernorm around the MLP (Gemma2/3)
    embed_scale: bool  # embeddings multiplied by the embedding module's embed_scale (Gemma)
    activation: str  # MLP gate activation: "silu" | "gelu_tanh" | "gelu"
    attn_softcap: float | None  # scores → cap·tanh(scores / cap) before the mask, as the model's attention implementation applies it
    final_softcap: float | None  # logits → cap·tanh(logits / cap)
    windows: tuple[int | None, ...]  # per layer: a query attends the last `window` positions (itself included), or all
    rotary_kinds: tuple[str | None, ...]  # per layer: the layer type passed to the rotary module, or None
    rope_types: tuple[str, ...]  # the RoPE variant of each distinct rotary kind
    exact_up_to: int | None  # longest sequence (tokens) for which the rotary angles depend on position only; None: any
    tied_head: bool  # lm_head shares the embedding matrix

    @property
    def kinds(self) -> tuple[str | None, ...]:
        """Distinct rotary kinds, in first-use order (index = a layer's table)."""
        return tuple(dict.fromkeys(self.rotary_kinds))

    def exact_for(self, max_length: int | None) -> bool:
        """Whether sequences up to ``max_length`` tokens (None: unbounded) are computed exactly."""
        if self.exact_up_to is None:
            return True
        return max_length is not None and max_length <= self.exact_up_to


class Unsupported(Exception):
    """Internal: the reason a model has no spec (it falls back to the Hugging Face forward)."""


def layer_windows(config) -> tuple[int | None, ...]:
    """Per layer, the sliding window Hugging Face's masks apply (keys at positions ``> q − window``),
    or None for full attention, as each family's model builds its masks. Unknown families: every
    layer windowed when the config has any sliding window or chunked attention (conservative:
    callers use it to keep Hugging Face's own evicting cache)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or 1
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    family = FAMILIES.get(getattr(text, "model_type", None))
    if family is None:
        windowed = (any("sliding" in str(t) or "chunk" in str(t) for t in types or [])
                    or window is not None or getattr(text, "attention_chunk_size", None) is not None
                    or bool(getattr(text, "use_sliding_window", False)))
        return tuple([window or 1] * layers) if windowed else (None,) * layers
    if family.windows == "uniform":
        return (window,) * layers
    if family.windows == "layer_types" and types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * layers


def has_sliding_layers(config) -> bool:
    """Whether the model has sliding-window attention layers, as its family builds its masks
    (:func:`layer_windows`; Mistral and Phi-3 through ``sliding_window`` alone). Hugging Face's
    ``DynamicCache(config=…)`` evicts their old positions."""
    return any(w is not None for w in layer_windows(config))


def _flag(config, value: str | bool) -> bool:
    return bool(getattr(config, value, False)) if isinstance(value, str) else value


def expected_tensors(spec: ModelSpec, config) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor the spec computes with, named as in the model's state dict
    (``model.layers.{i}.…``); ``lm_head.weight`` only when the head is not tied."""
    h, d, hid = spec.hidden, spec.head_dim, config.intermediate_size
    q, kv = spec.heads * d, spec.kv_heads * d
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tied_head:
        names["lm_head.weight"] = (config.vocab_size, h)
    for i in range(len(spec.windows)):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,), "self_attn.o_proj.weight": (h, q)}
        if spec.fused_qkv:
            layer["self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            layer.update({"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h)})
            if spec.qkv_bias:
                layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if spec.o_bias:
            layer["self_attn.o_proj.bias"] = (h,)
        if spec.qk_norm:
            layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        if spec.sandwich_norms:
            layer.update({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)})
        if spec.fused_gate_up:
            layer["mlp.gate_up_proj.weight"] = (2 * hid, h)
        else:
            layer.update({"mlp.gate_proj.weight": (hid, h), "mlp.up_proj.weight": (hid, h)})
        layer["mlp.down_proj.weight"] = (h, hid)
        if spec.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (hid,), "mlp.up_proj.bias": (hid,), "mlp.down_proj.bias": (h,)})
        names.update({p + k: v for k, v in layer.items()})
    return names


def check_checkpoint_keys(spec: ModelSpec, config, keys) -> None:
    """Raise :class:`SpecMismatchError` naming the first tensor the spec needs that ``keys`` (the
    tensor names of a checkpoint, e.g. its safetensors headers) lack. Loading such a checkpoint
    would fill the tensor with its initial value and train with wrong math, silently."""
    present = set(keys)
    for name in expected_tensors(spec, config):
        if name not in present:
            raise SpecMismatchError(f"{spec.name} config, but the checkpoint has no tensor {name}")


def check_checkpoint(model, folder) -> None:
    """:func:`check_checkpoint_keys` for a model loaded from ``folder`` (its ``*.safetensors``
    headers; nothing is checked for models without a spec or folders without safetensors).
    Call it after ``from_pretrained``, which fills missing tensors with initial values.

    Raises:
        SpecMismatchError: one line naming the first missing tensor.
    """
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files or getattr(getattr(model, "config", None), "model_type", None) not in FAMILIES:
        return
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    try:
        spec = read_spec(model)
    except Unsupported:
        return
    check_checkpoint_keys(spec, model.config, names)


def _check_weights(spec: ModelSpec, model) -> None:
    """The model's tensors against :func:`expected_tensors`: each present with its shape, and no
    parameter the spec would ignore (a bias the family does not have, say). One walk of the
    parameters: LoRA adapters' A and B skipped, a base weight under its own name."""
    from dapo_rl.models.lora import base_parameter_name, is_adapter_parameter

    expected = expected_tensors(spec, model.config)
    present = {base_parameter_name(name): tensor for name, tensor in model.named_parameters(remove_duplicate=False)
               if not is_adapter_parameter(name)}
    for name, shape in expected.items():
        tensor = present.get(name)
        if tensor is None:
            raise SpecMismatchError(f"{spec.name} config, but the model has no tensor {name}")
        if tuple(tensor.shape) != shape:
            raise SpecMismatchError(f"{spec.name} config, but {name} has shape {tuple(tensor.shape)}, expected {shape}")
    for name in present:
        if name not in expected and not (spec.tied_head and name == "lm_head.weight"):
            raise SpecMismatchError(f"{spec.name} config, but the model has a tensor the family does not use: {name}")


def read_spec(model) -> ModelSpec:
    """The spec of a Hugging Face causal LM.

    Raises:
        Unsupported: no spec for this model (the message is the reason).
        SpecMismatchError: a supported family whose weights do not match.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        reason = KNOWN_UNSUPPORTED.get(model_type, "this architecture")
        raise Unsupported(f"{type(model).__name__} ({model_type}): {reason}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        raise Unsupported(f"{type(model).__name__}: not the model.model.layers / lm_head layout of a causal LM")
    attn0 = inner.layers[0].self_attn
    windows = layer_windows(config)
    types = tuple(config.layer_types) if family.rotary_per_layer_type else None
    kinds = types if types is not None else (None,) * config.num_hidden_layers
    impl = getattr(config, "_attn_implementation", None) or "eager"
    activation = ACTIVATIONS.get(getattr(config, family.activation_key, None) or getattr(config, "hidden_act", None))
    embed = inner.embed_tokens.weight
    rotary = inner.rotary_emb
    rotary_dims, rope_types, exact_up_to = set(), [], None
    for kind in dict.fromkeys(kinds):
        rope = rotary.rope_type[kind] if kind is not None else rotary.rope_type
        rope_types.append(rope)
        if rope not in ROPE_TYPES:
            raise Unsupported(f"{family.name}: RoPE variant {rope!r}")
        cos, _ = _cos_of(rotary, embed, kind)
        rotary_dims.add(cos.shape[-1])
        # Dynamic grows its frequencies when a call's longest position passes max_position_embeddings,
        # longrope switches to its long factors past original_max_position_embeddings: past those
        # lengths the angles depend on the whole sequence, which a decode step cannot know.
        if rope == "dynamic":
            limit = int(rotary.original_max_seq_len) - 1
        elif rope == "longrope":
            params = config.rope_parameters[kind] if kind is not None else config.rope_parameters
            limit = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
        else:
            continue
        exact_up_to = limit if exact_up_to is None else min(exact_up_to, limit)
    head_dim = attn0.head_dim
    (rotary_dim,) = rotary_dims if len(rotary_dims) == 1 else (None,)
    gemma = family.gemma
    spec = ModelSpec(
        family=model_type, name=family.name, hidden=config.hidden_size, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads, head_dim=head_dim, rotary_dim=rotary_dim or head_dim,
        scaling=float(attn0.scaling), qkv_bias=_flag(config, family.qkv_bias), o_bias=_flag(config, family.o_bias),
        mlp_bias=_flag(config, family.mlp_bias), qk_norm=family.qk_norm, fused_qkv=family.fused,
        fused_gate_up=family.fused, norm_offset=1.0 if gemma else 0.0, sandwich_norms=gemma, embed_scale=gemma,
        activation=activation or "?",
        # SDPA kernels have no soft-capping: Hugging Face's SDPA path runs Gemma2 without it, and so do we.
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if gemma and impl == "eager" else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None,
        windows=windows, rotary_kinds=kinds, rope_types=tuple(rope_types), exact_up_to=exact_up_to,
        tied_head=model.lm_head.weight is embed,
    )
    _check_weights(spec, model)  # a mismatch is an error even where the model would fall back
    if impl not in ("sdpa", "eager"):
        raise Unsupported(f"{family.name}: attention implementation {impl!r}")
    if activation is None:
        raise Unsupported(f"{family.name}: activation {getattr(config, family.activation_key, None)!r}")
    if getattr(config, "pretraining_tp", 1) != 1:
        raise Unsupported(f"{family.name}: pretraining_tp > 1 (split projections)")
    if getattr(config, "use_bidirectional_attention", False):
        raise Unsupported(f"{family.name}: bidirectional attention")
    if rotary_dim is None or rotary_dim % 2 or (rotary_dim != head_dim and not family.partial_rotary):
        raise Unsupported(f"{family.name}: rotary width {sorted(rotary_dims)} per head of {head_dim}")
    if family.windows == "layer_types" and any(t not in ("full_attention", "sliding_attention") for t in config.layer_types):
        raise Unsupported(f"{family.name}: layer types {sorted(set(config.layer_types))}")
    if any(w is not None and w < 1 for w in windows):
        raise Unsupported(f"{family.name}: sliding windows {windows}")
    return spec


def _cos_of(rotary, embed, kind):
    import torch

    from dapo_rl.models.rotary import rotary_cos_sin

    return rotary_cos_sin(rotary, embed[:1].detach()[None], torch.arange(2, device=embed.device), kind)


# Reasons already announced in this process (tests may clear it).
announced: set[str] = set()


def announce_fallback(reason: str) -> None:
    """Log, once per process and reason, that a model runs through the Hugging Face forward."""
    if reason not in announced:
        announced.add(reason)
        logger.warning("%s; using the Hugging Face forward", reason)


def fast_spec(model, max_length: int | None = None) -> ModelSpec | None:
    """The spec when the fast paths compute this model exactly for sequences up to ``max_length``
    tokens (None: any length), else None after announcing the fallback once in one line.

    Falls back for: architectures without a spec, attention implementations other than sdpa and
    eager, other activations, ``pretraining_tp`` > 1, and dynamic/longrope RoPE past the length
    where their angles stop being a function of position alone.

    Raises:
        SpecMismatchError: the config names a supported family, the weights do not match it.
    """
    try:
        spec = read_spec(model)
    except Unsupported as reason:
        announce_fallback(f"{reason} not supported by the fast decoder")
        return None
    if not spec.exact_for(max_length):
        announce_fallback(f"{spec.name}: {'/'.join(spec.rope_types)} RoPE past {spec.exact_up_to} tokens (angles that depend "
                          "on the sequence length) not supported by the fast decoder")
        return None
    return spec


def supports_fast_path(model, max_length: int | None = None) -> bool:
    """Whether :func:`fast_spec` gives a spec (announcing the fallback once when not)."""
    return fast_spec(model, max_length) is not None
