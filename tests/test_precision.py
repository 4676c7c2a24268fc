"""Sampling and training precision: how ``auto`` resolves, the probe's cache, the correction that
comes with bf16 sampling, and the configuration's refusals. (The numerics of bf16 decoding and
bf16-autocast training, per family: tests/test_model_families.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from dapo_rl.config import ConfigError, load_config
from dapo_rl.models import precision
from dapo_rl.models.precision import MIN_BF16_HIDDEN, MIN_SPEEDUP, native_bf16, resolve_precision, training_precision
from dapo_rl.rollout.decoder_engine import DecoderEngine, sampling_precision
from dapo_rl.training.compose import correction_mode

CPU = torch.device("cpu")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags the precision module reads."""
    def set_flags(flags: str):
        monkeypatch.setattr(precision, "cpu_info", lambda key: flags if key == "flags" else "Test CPU")
    return set_flags


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """Count probes and fix their result; the cache goes to a fresh folder."""
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path))
    precision._cached_speedup.cache_clear()
    calls = []

    def fake(hidden, width, rows, repeats=15):
        calls.append((hidden, width, rows))
        return fake.speedup

    fake.speedup = 2.0
    monkeypatch.setattr(precision, "probe_speedup", fake)
    yield fake, calls
    precision._cached_speedup.cache_clear()


def test_explicit_settings_are_taken_as_they_are(cpu_flags):
    cpu_flags("fpu sse")  # even without native bf16: the user asked
    assert resolve_precision("float32", CPU, 4096, 8192).dtype == torch.float32
    assert resolve_precision("bfloat16", CPU, 64, 128).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="use auto, float32 or bfloat16"):
        resolve_precision("half", CPU, 64, 128)


def test_auto_is_float32_without_native_bf16_and_says_why(cpu_flags, probes):
    cpu_flags("fpu sse avx2 avx512f")
    chosen = resolve_precision("auto", CPU, 1024, 4096)
    assert chosen.dtype == torch.float32 and "no native bf16" in chosen.reason
    assert probes[1] == []  # nothing timed
    cpu_flags("fpu avx512_bf16")
    assert native_bf16(CPU) is None
    cpu_flags("fpu amx_bf16 amx_tile")
    assert native_bf16(CPU) is None


def test_auto_is_float32_for_small_models_without_probing(cpu_flags, probes):
    cpu_flags("amx_bf16 avx512_bf16")
    chosen = resolve_precision("auto", CPU, MIN_BF16_HIDDEN - 1, 4096)
    assert chosen.dtype == torch.float32 and "too small" in chosen.reason
    assert probes[1] == []


def test_auto_follows_the_probe_and_measures_once_per_machine(cpu_flags, probes, tmp_path):
    cpu_flags("amx_bf16 avx512_bf16")
    fake, calls = probes
    fake.speedup = MIN_SPEEDUP + 0.5
    first = resolve_precision("auto", CPU, 576, 3072)
    assert first.dtype == torch.bfloat16 and "measured 1.75x" in first.reason
    assert resolve_precision("auto", CPU, 576, 3072) == first
    precision._cached_speedup.cache_clear()  # a new process reads the file, and does not probe again
    fake.speedup = 0.5
    assert resolve_precision("auto", CPU, 576, 3072) == first
    assert calls == [(576, 3072, precision.DECODE_ROWS)]
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert list(saved.values()) == [MIN_SPEEDUP + 0.5]
    slower = resolve_precision("auto", CPU, 576, 4096, use="train")  # another shape: probed, slower: float32
    assert slower.dtype == torch.float32 and "needs 1.25x" in slower.reason
    assert calls[-1] == (576, 4096, precision.TRAIN_ROWS)


def test_the_probe_times_real_products():
    assert precision.probe_speedup(64, 128, 4, repeats=2) > 0


def _llama(hidden: int) -> torch.nn.Module:
    config = tf.LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).float()


def test_the_fast_engine_resolves_its_precision_and_bf16_sampling_is_corrected_by_default(cpu_flags, probes):
    cpu_flags("amx_bf16")
    config = load_config(None, [])
    model = _llama(MIN_BF16_HIDDEN)
    tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    engine = DecoderEngine.from_config(config, model, tokenizer)
    assert engine.precision == "bfloat16" and "measured" in engine.precision_reason
    assert "bfloat16" in engine.describe()
    assert correction_mode(config, engine) == "token_truncate"
    probes[0].speedup = 1.0
    precision._cached_speedup.cache_clear()
    model = _llama(MIN_BF16_HIDDEN + 64)  # another shape, measured slower here
    fp32 = DecoderEngine.from_config(config, model, tokenizer)
    assert fp32.precision is None and correction_mode(config, fp32) == "none"
    assert correction_mode(config, fp32, autocast_dtype=torch.bfloat16) == "token_truncate"  # bf16 training
    explicit = load_config(None, ["rollout_correction.mode=none"])
    assert correction_mode(explicit, engine) == "none"


def test_training_auto_follows_the_probe_at_a_training_forwards_rows(cpu_flags, probes):
    cpu_flags("amx_bf16")
    fake, calls = probes
    config = _llama(MIN_BF16_HIDDEN).config
    chosen = training_precision("auto", config, CPU)
    assert chosen.autocast_dtype == torch.bfloat16 and "train shape" in chosen.reason
    assert calls == [(MIN_BF16_HIDDEN, 2 * config.intermediate_size, precision.TRAIN_ROWS)]
    fake.speedup = 1.0
    precision._cached_speedup.cache_clear()
    slower = training_precision("auto", _llama(MIN_BF16_HIDDEN + 64).config, CPU)
    assert slower.autocast_dtype is None and "needs 1.25x" in slower.reason
    cpu_flags("avx2")
    assert training_precision("auto", config, CPU).autocast_dtype is None  # no native bf16: never probed
    assert len(calls) == 2


def test_under_torchrun_rank_0_alone_probes_and_every_rank_takes_its_answer(cpu_flags, probes, tmp_path):
    """Another rank neither probes nor keeps its own answer: it takes what rank 0 sends."""
    from types import SimpleNamespace

    from dapo_rl.training.compose import training_autocast

    cpu_flags("amx_bf16")
    fake, calls = probes
    config, model = load_config(None, []), _llama(MIN_BF16_HIDDEN)
    sent = []
    rank0 = SimpleNamespace(enabled=True, is_main=True, all_gather_objects=lambda obj: sent.append(obj) or [obj, None])
    chosen = training_autocast(config, model, CPU, rank0)
    assert chosen.autocast_dtype == torch.bfloat16 and len(calls) == 1
    rank1 = SimpleNamespace(enabled=True, is_main=False, all_gather_objects=lambda obj: [sent[0], obj])
    fake.speedup = 0.5  # what rank 1 would measure, were it to probe
    precision._cached_speedup.cache_clear()  # ranks probe at once: neither finds the other's result
    (tmp_path / "precision.json").unlink()
    assert training_autocast(config, model, CPU, rank1) == chosen and len(calls) == 1


def test_under_torchrun_rank_0_alone_resolves_the_sampling_precision(cpu_flags, probes, tmp_path):
    """``rollout.dtype=auto`` as ``model.dtype=auto`` above: rank 0's engine probes, another
    rank's engine samples in rank 0's precision without probing, and says rank 0's reason."""
    from types import SimpleNamespace

    from dapo_rl.training.compose import rollout_engine

    cpu_flags("amx_bf16")
    fake, calls = probes
    config, model = load_config(None, []), _llama(MIN_BF16_HIDDEN)
    tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    sent = []
    rank0 = SimpleNamespace(enabled=True, is_main=True, all_gather_objects=lambda obj: sent.append(obj) or [obj, None])
    first = rollout_engine(config, model, tokenizer, rank0)
    assert first.precision == "bfloat16" and len(calls) == 1
    rank1 = SimpleNamespace(enabled=True, is_main=False, all_gather_objects=lambda obj: [sent[0], obj])
    fake.speedup = 0.5  # what rank 1 would measure, were it to probe
    precision._cached_speedup.cache_clear()
    (tmp_path / "precision.json").unlink()
    other = rollout_engine(config, model, tokenizer, rank1)
    assert other.precision == "bfloat16" and other.precision_reason == first.precision_reason and len(calls) == 1


def test_under_torchrun_the_other_ranks_stop_when_rank_0_cannot_build_its_engine(monkeypatch):
    from types import SimpleNamespace

    from dapo_rl.training import compose
    from dapo_rl.training.errors import RunError

    config, model = load_config(None, []), _llama(64)
    rank1 = SimpleNamespace(enabled=True, is_main=False, all_gather_objects=lambda obj: [None, obj])
    with pytest.raises(RunError, match="rank 0 could not build its engine"):
        compose.rollout_engine(config, model, None, rank1)
    sent = []
    rank0 = SimpleNamespace(enabled=True, is_main=True, all_gather_objects=lambda obj: sent.append(obj) or [obj, None])
    with pytest.raises(AttributeError):  # no tokenizer: rank 0's own error, after it told the others
        compose.rollout_engine(config, model, None, rank0)
    assert sent == [None]


def test_a_run_trains_under_the_autocast_auto_chose_and_corrects_for_it(cpu_flags, probes, monkeypatch, tmp_path,
                                                                        quickstart_cache, capsys):
    """``model.dtype=auto`` reaches the trainer: with the probe saying bf16 (the size floor lowered
    so the quickstart model qualifies), one step trains under bf16 autocast, says so in one line,
    and the rollout correction turns on (the fp32 sampler now differs from the trainer)."""
    from dapo_rl.training.run import run_training

    cpu_flags("amx_bf16")
    monkeypatch.setattr(precision, "MIN_BF16_HIDDEN", 32)
    run = tmp_path / "run"
    config = load_config(overrides=[f"output_dir={run}", f"quickstart.cache_dir={quickstart_cache}", "steps=1",
                                    "data.eval=null", "logging.progress=false", "rollout.dtype=float32"])
    run_training(config)
    out = capsys.readouterr()
    assert "model.dtype=auto: bfloat16, measured 2.00x" in out.out + out.err
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # Correction on (π_old is computed and compared with the sampler's log-probs), and the bf16
    # trainer differs from the fp32 sampler by more than fp32 rounding.
    assert step["rollout/logp_abs_diff"] > 1e-4 and step["rollout/is_weight_mean"] == pytest.approx(1.0, abs=0.2)


def test_lora_models_sample_in_their_own_dtype(cpu_flags, probes, adapters):
    cpu_flags("amx_bf16")
    model = adapters(_llama(MIN_BF16_HIDDEN))
    chosen = sampling_precision("auto", model)
    assert chosen.dtype == torch.float32 and "LoRA" in chosen.reason
    with pytest.raises(ValueError, match="rollout.dtype=bfloat16"):
        sampling_precision("bfloat16", model)


@pytest.mark.parametrize("overrides, fragment", [
    (["rollout.vllm_dtype=bfloat16"], "did you mean rollout.dtype"),
    (["rollout.dtype=float16"], "float16 is for the vLLM engines"),
    (["rollout.dtype=bfloat16", "rollout.engine=hf"], "samples in the training model's own dtype"),
    (["rollout.dtype=bf16"], "rollout.dtype"),
])
def test_precision_settings_that_cannot_work_are_refused_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_a_run_saved_before_rollout_dtype_resumes_with_the_precision_it_had(tmp_path):
    """config.yaml written with rollout.vllm_dtype: read under rollout.dtype, float32 for the
    in-process engines (what they did then), the vLLM value for vLLM; resume accepts it."""
    from dapo_rl.config import migrate_saved_keys, to_yaml
    from dapo_rl.training.run_folder import check_output_dir

    assert migrate_saved_keys({"rollout.engine": "fast", "rollout.vllm_dtype": "auto"}) == {"rollout.engine": "fast",
                                                                                            "rollout.dtype": "float32"}
    assert migrate_saved_keys({"rollout.engine": "vllm", "rollout.vllm_dtype": "float16"})["rollout.dtype"] == "float16"
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, [f"output_dir={run}", "rollout.dtype=float32"])
    old = to_yaml(config).replace("  dtype: float32\n", "  vllm_dtype: auto\n", 1)
    assert "vllm_dtype: auto" in old and "rollout" in old
    (run / "config.yaml").write_text(old)
    assert load_config(run / "config.yaml", [], saved_run=True).rollout.dtype == "float32"
    resumed = load_config(None, [f"output_dir={run}", "rollout.dtype=float32", "resume=true"])
    assert check_output_dir(resumed) == run
    with pytest.raises(ConfigError, match="vllm_dtype"):  # a user's own file still gets the did-you-mean
        load_config(run / "config.yaml", [])
