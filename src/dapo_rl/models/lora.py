"""LoRA adapters on a policy: adding them (PEFT, through transformers' adapter integration), the
weights the fast paths read, the base with adapters disabled (the KL reference), adapter folders
in PEFT's format, and the merged weights (written by :func:`~dapo_rl.models.loading.export_merged`).

The adapted model stays the Hugging Face causal LM it was (``model.model.layers``, ``lm_head``):
each targeted ``nn.Linear`` becomes PEFT's ``lora.Linear``, holding the frozen ``base_layer``
``W [out, in]`` and the trainable ``lora_A [r, in]`` / ``lora_B [out, r]``; its output is
``x·Wᵀ + (alpha / r) · dropout(x)·Aᵀ·Bᵀ``. B starts at 0, so a fresh adapter computes exactly the
base model. Base weights are never modified or copied per step:

- the trainer's forward (the module calls, and :mod:`dapo_rl.models.packed_forward`'s fused products via
  :func:`lora_output`) computes the adapter's term on the fly, so no gradient of ``W`` is formed;
- the sampling engine's decoder reads the frozen base where it lies and adds each adapter's
  low-rank term on the fly (:func:`low_rank_factors`): a fused or packed copy of a base that never
  changes would double the weights' memory, which is what LoRA saves;
- vLLM receives those merged tensors under the base model's names (:func:`merged_parameters`).

Only this module imports PEFT (an optional extra: ``pip install 'dapo-rl[lora]'``); the readers
(:func:`lora_output`, :func:`effective_weight`) work on any module by duck typing.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dapo_rl.config import LORA_ALL_LINEAR

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter
PEFT_PREFIX = "base_model.model."  # PeftModel's parameter names, as adapter files store them


class AdapterError(ValueError):
    """An adapter setting or folder that cannot work; the one-line message starts with the key."""


# ---------------------------------------------------------------- reading adapted modules


def _active(module) -> list[str]:
    """The adapters that change ``module``'s output now (none for a plain module, disabled or merged adapters)."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def lora_output(module, x: torch.Tensor) -> torch.Tensor | None:
    """The adapters' term ``(alpha / r) · B(A(dropout(x)))`` ``[..., out]`` of ``module`` for input
    ``x [..., in]`` (differentiable), or None when no adapter is active: what PEFT's ``lora.Linear``
    adds to its base product."""
    out = None
    for name in _active(module):
        term = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](x))) * module.scaling[name]
        out = term if out is None else out + term
    return out


def effective_weight(module) -> torch.Tensor:
    """``module``'s weight ``[out, in]`` with its active adapters merged in (``W + (alpha / r)·B·A``,
    a new tensor; ``W`` untouched), or its own weight when it has none."""
    weight = module.weight
    for name in _active(module):
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


def low_rank_factors(module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per active adapter of ``module``, ``(A [r, in], (alpha / r)·B [out, r])`` (detached; the
    scaled ``B`` a new small tensor): the adapter adds ``(x·Aᵀ)·((alpha / r)·B)ᵀ`` to the output
    (dropout is a training-time term, left out)."""
    return [(module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach() * module.scaling[name])
            for name in _active(module)]


def adapters_active(model: torch.nn.Module) -> bool:
    """Whether any projection of ``model`` has an adapter that changes its output now."""
    return any(_active(module) for _, module in adapter_layers(model))


def adapter_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every adapted projection."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False)) or bool(adapter_layers(model))


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (model or adapter-file naming) is an adapter's."""
    return ".lora_A." in name or ".lora_B." in name


def base_parameter_name(name: str) -> str:
    """The base model's name of a parameter of an adapted model (``q_proj.base_layer.weight`` → ``q_proj.weight``)."""
    return name.replace(".base_layer.", ".")


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model, adapters switched off (PEFT's ``disable_adapters``) inside the block: the KL
    reference of a LoRA run, without a second copy of the weights. PEFT also changes the
    adapters' ``requires_grad`` when it switches them; the flags are restored as they were."""
    if not has_adapters(model):
        yield
        return
    flags = [(p, p.requires_grad) for name, p in model.named_parameters() if is_adapter_parameter(name)]
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()
        for param, flag in flags:
            param.requires_grad_(flag)


def merged_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of the merged model under the base model's names (tied ones once, as
    ``named_parameters`` lists them): adapted weights as :func:`effective_weight` (new tensors),
    everything else the model's own (detached), adapter tensors left out."""
    adapted = dict(adapter_layers(model))
    out = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                continue
            module_name, _, leaf = name.rpartition(".base_layer.")
            tensor = effective_weight(adapted[module_name]) if leaf == "weight" and module_name in adapted else param
            out[base_parameter_name(name)] = tensor.detach()
    return out


def save_merged(model: torch.nn.Module, folder: str | Path) -> None:
    """An ordinary model folder (``config.json`` + ``model.safetensors``, no tokenizer) of the
    merged weights of an adapted ``model``, loadable with ``from_pretrained``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file({k: v.contiguous().cpu() for k, v in merged_parameters(model).items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def save_servable(model: torch.nn.Module, folder: str | Path) -> None:
    """A model folder an inference server (vLLM) can load: ``save_pretrained`` of a plain model,
    the merged weights of an adapted one (its ``save_pretrained`` would write the adapter alone)."""
    if has_adapters(model):
        save_merged(model, folder)
    else:
        model.save_pretrained(folder)


# ---------------------------------------------------------------- adding adapters


def projection_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of the linear projections inside the decoder layers: what
    ``target_modules`` may name, and what ``all-linear`` means."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name and "lm_head" not in name})
    return sorted({name.rpartition(".")[2] for name, m in layers.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" not in name and not name.endswith("base_layer")})


def resolve_targets(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """``target_modules`` checked against the model (``all-linear`` expanded).

    Raises:
        AdapterError: a name that matches no projection (the message lists the real ones), or
            one outside the decoder layers (embeddings, LM head: not supported).
    """
    real = projection_names(model)
    shown = ", ".join(real[:8]) + (", ..." if len(real) > 8 else "")
    if list(target_modules) == [LORA_ALL_LINEAR]:
        return real
    leaves = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    for name in target_modules:
        if name == LORA_ALL_LINEAR:
            raise AdapterError(f"model.lora.target_modules: {LORA_ALL_LINEAR} cannot be combined with other names; "
                               f"use [{LORA_ALL_LINEAR}] alone or list projections ({shown})")
        if name not in real:
            where = ("is not a projection of attention or MLP, which is where adapters go" if name in leaves
                     else "matches no module of this model")
            raise AdapterError(f"model.lora.target_modules: {name!r} {where}; this model's projections are {shown} "
                               f"(or use {LORA_ALL_LINEAR})")
    return sorted(set(target_modules))


def read_adapter_config(folder: str | Path) -> dict:
    """The ``adapter_config.json`` of an adapter folder.

    Raises:
        AdapterError: no such file, unreadable, or a PEFT method other than plain LoRA.
    """
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {path} ({exc}); an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{path}: only plain LoRA adapters are supported (no DoRA, rank or alpha patterns, other PEFT methods)")
    return config


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def add_adapters(model: torch.nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str],
                 base_path: str, init_from: str | None = None, seed: int = 0) -> None:
    """Add trainable LoRA adapters (B = 0, A seeded by ``seed``, the global RNG untouched) to
    ``model`` in place and freeze everything else; with ``init_from``, load that adapter folder's
    weights instead. ``base_path`` is recorded in the adapter's config (``base_model_name_or_path``).

    Raises:
        AdapterError: bad target names, or an ``init_from`` whose settings or tensors do not
            match (an adapter trained for another base model).
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError:
        raise AdapterError("model.lora.r: LoRA needs PEFT; pip install 'dapo-rl[lora]' (peft), or set model.lora.r=0") from None
    targets = resolve_targets(model, target_modules)
    if init_from is not None:
        _check_init_config(init_from, r, alpha, targets)
    config = PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                            init_lora_weights=True, base_model_name_or_path=str(base_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    if init_from is not None:
        load_adapter_weights(model, init_from, key="model.lora.init_from")


def _check_init_config(folder: str, r: int, alpha: float, targets: list[str]) -> None:
    saved = read_adapter_config(folder)
    saved_targets = saved.get("target_modules") or []
    saved_targets = sorted([saved_targets] if isinstance(saved_targets, str) else saved_targets)
    for key, mine, theirs in (("r", r, saved.get("r")), ("alpha", alpha, saved.get("lora_alpha")),
                              ("target_modules", targets, saved_targets)):
        if theirs is not None and (mine != theirs if key != "alpha" else float(mine) != float(theirs)):
            shown = "[" + ",".join(theirs) + "]" if key == "target_modules" else theirs
            raise AdapterError(f"model.lora.init_from: the adapter in {folder} has {key}={theirs} but model.lora.{key} is "
                               f"{mine}; set model.lora.{key}={shown} to continue it")


def to_model_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter-file names (``base_model.model.….lora_A.weight``) → the adapted model's
    (``….lora_A.default.weight``)."""
    out = {}
    for name, tensor in weights.items():
        name = name.removeprefix(PEFT_PREFIX)
        for part in (".lora_A.", ".lora_B."):
            if part in name and f"{part}{ADAPTER_NAME}." not in name:
                name = name.replace(part, f"{part}{ADAPTER_NAME}.")
        out[name] = tensor
    return out


def load_adapter_weights(model: torch.nn.Module, folder: str | Path, *, key: str) -> None:
    """Copy the adapter tensors of ``folder`` into ``model``'s adapters.

    Raises:
        AdapterError: (message starting with ``key``) a tensor this model has no place for, one of
            another shape, or an adapter of the model that the folder lacks: the adapter was
            trained for a different base.
    """
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{key}: {folder} has no {ADAPTER_WEIGHTS}; point it at an adapter folder (a LoRA run's final/)")
    base = read_adapter_config(folder).get("base_model_name_or_path") or "unknown"
    weights = to_model_names(load_file(str(path)))
    params = dict(model.named_parameters())
    for name, tensor in weights.items():
        mine = params.get(name)
        if mine is None or mine.shape != tensor.shape:
            found = "has no such tensor" if mine is None else f"has shape {tuple(mine.shape)}"
            raise AdapterError(f"{key}: the adapter in {folder} was trained for a different base model ({base}): its "
                               f"{name} {tuple(tensor.shape)} does not fit (this model {found}); use an adapter of this model")
    missing = [n for n in params if is_adapter_parameter(n) and n not in weights]
    if missing:
        raise AdapterError(f"{key}: the adapter in {folder} lacks {missing[0]} (and {len(missing) - 1} more); "
                           f"it was made for a different base model ({base}) or other target_modules")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def adapter_from_folder(model: torch.nn.Module, folder: str | Path, base_path: str) -> None:
    """Add the adapter of ``folder`` to ``model`` (its saved settings, its weights), for sampling
    or evaluation (``dapo eval`` of a LoRA run's ``final/``)."""
    saved = read_adapter_config(folder)
    targets = saved.get("target_modules") or [LORA_ALL_LINEAR]
    add_adapters(model, r=int(saved["r"]), alpha=float(saved.get("lora_alpha", saved["r"])),
                 dropout=float(saved.get("lora_dropout", 0.0)), target_modules=[targets] if isinstance(targets, str) else list(targets),
                 base_path=base_path, init_from=str(folder))


def base_of(folder: str | Path, base: str | None = None) -> str:
    """The base model an adapter folder was trained on: ``base`` when given, else its
    ``adapter_config.json``'s ``base_model_name_or_path``.

    Raises:
        AdapterError: neither names one.
    """
    if base:
        return base
    named = read_adapter_config(folder).get("base_model_name_or_path")
    if not named:
        raise AdapterError(f"{Path(folder) / ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass base=BASE_FOLDER")
    return named
