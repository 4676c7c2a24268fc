"""Load the policy a run or an evaluation names, and pick its device: one loader for
``dapo train`` and ``dapo eval``; and :func:`export_merged`, which loads a LoRA run's adapter on
its base and writes the merged model as an ordinary folder (``dapo export-merged``).

Every failure is a :class:`ModelLoadError` whose one-line message says which folder and what is
wrong with it; callers prefix the key the user set (``model.path``, ``MODEL``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dapo_rl.config import BUILTIN_PREFIX, LoraConfig, QuickstartConfig
from dapo_rl.errors import one_line
from dapo_rl.models import lora as adapters
from dapo_rl.models.spec import SpecMismatchError, check_checkpoint


class ModelLoadError(ValueError):
    """A model folder, device or dtype that cannot be used; the message says why and the fix."""


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The device ``device`` names; ``auto`` picks CUDA when present (``cuda:LOCAL_RANK`` under
    torchrun, one GPU per process). What the products compute in is decided once the model is
    known (:func:`dapo_rl.models.precision.training_precision`)."""
    name = device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    resolved = torch.device(name)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"{name} requested but CUDA is not available; use cpu")
    return resolved


def load_policy(path: str, *, quickstart: QuickstartConfig | None = None, seed: int = 0, progress: bool = True,
                gradient_checkpointing: bool = False, lora: LoraConfig | None = None, base: str | None = None):
    """The causal LM and tokenizer in the Hugging Face folder ``path``, in float32, or the built-in
    policy (``builtin:chain-tiny``, or ``builtin:<task>-tiny`` for another task of
    :data:`dapo_rl.data.synthetic.CHAIN_TASKS`), built and warmed up locally with ``quickstart`` and ``seed``.

    A tokenizer without a pad token pads with its EOS token.

    LoRA: with ``lora.r > 0``, trainable adapters are added (:func:`dapo_rl.models.lora.add_adapters`;
    ``lora.init_from`` continues an adapter folder) and the base is frozen. ``path`` may also be an
    adapter folder (a LoRA run's ``final/``): its base (``base``, else the folder's
    ``adapter_config.json``) is loaded and the adapter added to it.

    Raises:
        ModelLoadError: an unusable folder (callers prefix the key the user set).
        AdapterError: a LoRA setting or adapter folder that cannot work (the message names the key).
    """
    if adapters.is_adapter_folder(path):
        if lora is not None and lora.r > 0:
            raise adapters.AdapterError(f"model.path: {path} is an adapter folder; set model.path to its base model and "
                                        f"model.lora.init_from={path} to continue training it")
        base_path = adapters.base_of(path, base)
        model, tokenizer = load_policy(base_path, quickstart=quickstart, seed=seed, progress=progress,
                                       gradient_checkpointing=gradient_checkpointing)
        adapters.adapter_from_folder(model, path, base_path)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_rl.models.quickstart import builtin_model_task, prepare_quickstart_model

    if path.startswith(BUILTIN_PREFIX):
        try:
            task = builtin_model_task(path)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        path = str(prepare_quickstart_model(quickstart or QuickstartConfig(), seed=seed, progress=progress, task=task))
    elif not Path(path).is_dir():
        raise ModelLoadError(f"{path} is not a folder; give a local Hugging Face model folder (see `dapo convert-gguf` for SmolLM2)")
    elif not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model folder; "
                             f"point it at a folder written by save_pretrained (config.json, weights, tokenizer)")
    # transformers reports a broken folder with many exception types and multi-line messages;
    # the user needs one line that says which folder and what is wrong with it.
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means the folder is unusable
        raise ModelLoadError(f"cannot load a tokenizer from {path} ({one_line(exc, 240)}); "
                             f"the folder needs tokenizer files (tokenizer.json or tokenizer_config.json)") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in {path} has neither a pad nor an EOS token; set eos_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure here means the folder is unusable
        raise ModelLoadError(f"cannot load a causal language model from {path} ({one_line(exc, 240)}); "
                             f"check config.json and the weight files (*.safetensors)") from None
    try:
        # from_pretrained fills a missing tensor with its initial value: a family whose weights
        # do not match its config would train with wrong math, silently.
        check_checkpoint(model, path)
    except SpecMismatchError as exc:
        raise ModelLoadError(f"{exc} (in {path}); the weights do not match config.json's model_type") from None
    if lora is not None and lora.r > 0:
        adapters.add_adapters(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules),
                              base_path=path, init_from=lora.init_from, seed=seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora is not None and lora.r > 0:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input that requires grad
    return model, tokenizer


def export_merged(source: str | Path, out: str | Path, *, base: str | None = None, overwrite: bool = False) -> dict:
    """Write the merged model of an adapter (``source``: a LoRA run folder, whose ``final/`` holds
    it, or an adapter folder) as an ordinary model folder ``out`` (weights, config, tokenizer),
    loadable with ``AutoModelForCausalLM.from_pretrained``. Returns what was written, with the
    largest |Δ logit| between the merged folder, reloaded, and base + adapter on a probe.

    Raises:
        AdapterError: no adapter in ``source``, an unusable base, or ``out`` exists (without ``overwrite``).
    """
    import shutil

    from transformers import AutoModelForCausalLM

    source, out = Path(source), Path(out)
    folder = source / "final" if adapters.is_adapter_folder(source / "final") else source
    if not adapters.is_adapter_folder(folder):
        raise adapters.AdapterError(f"RUN_DIR: {source} holds no LoRA adapter ({adapters.ADAPTER_CONFIG} in it or in its final/); "
                                    f"pass a LoRA run folder or an adapter folder")
    if out.exists() and not overwrite:
        raise adapters.AdapterError(f"OUT: {out} already exists; choose another folder or pass --overwrite")
    try:
        model, tokenizer = load_policy(str(folder), base=base, progress=False)
    except ModelLoadError as exc:
        raise adapters.AdapterError(f"base: {exc}") from None
    model.eval()
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    adapters.save_merged(model, staging)
    tokenizer.save_pretrained(staging)
    merged = AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch.float32).eval()
    probe = torch.arange(min(16, model.config.vocab_size))[None]
    with torch.no_grad():
        diff = (merged(probe).logits - model(probe).logits).abs().max().item()
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return {"out_dir": str(out), "adapter": str(folder), "base": adapters.base_of(folder, base),
            "parameters": sum(p.numel() for p in merged.parameters()), "max_abs_logit_diff": diff}
