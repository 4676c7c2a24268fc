"""Bad input to ``dapo train`` (issue 5): each case ends with exit code 2 and exactly one line
on stderr that names the key (or the file and row) and the fix, with no traceback, and leaves
the output folder as it was.

Most cases call :func:`dapo_rl.cli.main` in-process (the same code path as the console script,
without paying the torch/transformers import per case); a few run the real command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_rl.cli import main

SMALL = ["steps=1", "prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16",
         "data.builtin_eval_size=8", "data.builtin_train_size=64", "logging.progress=false"]


@pytest.fixture(scope="module")
def cache(request) -> str:
    """``$DAPO_RL_TEST_CACHE`` when set (reused across sessions), else the session's model cache."""
    return os.environ.get("DAPO_RL_TEST_CACHE") or request.getfixturevalue("quickstart_cache")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Broken config files, datasets and model folders, written once."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "syntax.yaml").write_text("steps: 3\nclip: [0.2,\n")
    (root / "list.yaml").write_text("- steps\n- 3\n")
    (root / "unknown.yaml").write_text("stepz: 3\n")
    (root / "section.yaml").write_text("clip: 3\n")
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"prompt": "1+1=", "answer": "2"\n{"prompt": \n')
    (root / "fields.jsonl").write_text('{"question": "1+1=", "solution": "2"}\n')
    (root / "types.jsonl").write_text('{"prompt": 5, "answer": "2"}\n{"prompt": ["x"], "answer": "2"}\n')
    (root / "empty_prompts.jsonl").write_text('{"prompt": "", "answer": "2"}\n{"prompt": "   ", "answer": "3"}\n')
    (root / "data.txt").write_text("1+1=2\n")
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"")
    (root / "broken_config").mkdir()
    (root / "broken_config" / "config.json").write_text("{not json")
    _qwen3_without_a_q_norm(root / "qwen3_no_qnorm")
    return root


def _qwen3_without_a_q_norm(folder: Path) -> None:
    """A Qwen3 folder whose weights lack one per-head query norm (``from_pretrained`` would fill it with ones)."""
    import safetensors.torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer(VOCAB)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k not in ("model.layers.1.self_attn.q_norm.weight", "lm_head.weight")}
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _train(capfd, *args: str) -> tuple[int, str]:
    capfd.readouterr()
    rc = main(["train", *args])
    return rc, capfd.readouterr().err


def _assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: "nothing overwritten" made checkable."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Config mistakes: found before anything is loaded. (case id, overrides, text the line must hold)
CONFIG_CASES = [
    ("unknown-key", ["stepz=3"], ["'stepz'", "did you mean 'steps'"]),
    ("unknown-nested-key", ["clip.eps_hi=0.3"], ["'clip.eps_hi'", "check the spelling"]),
    ("mistyped-int", ["steps=abc"], ["'steps'", "expected an integer"]),
    ("mistyped-bool", ["resume=maybe"], ["'resume'", "true or false"]),
    ("section-given-a-value", ["clip=3"], ["'clip' is a section", "clip.eps_low="]),
    ("group-size-1", ["group_size=1"], ["group_size", "set group_size=2 or more"]),
    ("mini-batch-not-dividing", ["prompts_per_step=16", "mini_batch_size=5"], ["mini_batch_size", "divisor"]),
    ("micro-batch-not-dividing", ["micro_batch_size=7"], ["micro_batch_size", "divisor"]),
    ("eps-low-out-of-range", ["clip.eps_low=1.5"], ["clip.eps_low", "[0, 1)"]),
    ("eps-high-negative", ["clip.eps_high=-0.1"], ["clip.eps_high", ">= 0"]),
    ("cache-not-below-max", ["overlong.cache_length=16"], ["overlong.cache_length", "smaller cache_length"]),
    ("unknown-choice", ["loss.agg_mode=sum"], ["loss.agg_mode", "token-mean"]),
    ("resume-and-overwrite", ["resume=true", "overwrite=true"], ["resume", "choose one"]),
    ("override-without-value", ["steps"], ["'steps'", "key=value"]),
    ("bad-device", ["model.device=tpu"], ["model.device", "cuda:N"]),
    ("unknown-strategy", ["distributed.strategy=fsdp"], ["distributed.strategy", "fsdp2"]),
    ("unknown-sink", ["logging.sinks=[jsonl,foo]"], ["logging.sinks", "tensorboard"]),
    ("unknown-template", ["data.template=fancy"], ["data.template", "raw"]),
    ("unknown-policy-loss", ["loss.policy_loss=ppo2"], ["loss.policy_loss", "decoupled_clip", "gspo", "cispo"]),
    ("policy-loss-import-path", ["loss.policy_loss=no_such_pkg_xyz:loss"], ["loss.policy_loss", "cannot import"]),
    ("unknown-estimator", ["advantage.estimator=rloo"], ["advantage.estimator", "grpo", "drgrpo"]),
    ("unknown-kl-estimator", ["loss.kl_estimator=k9"], ["loss.kl_estimator", "k3"]),
    ("negative-entropy-coef", ["loss.entropy_coef=-0.01"], ["loss.entropy_coef", ">= 0", "use 0 (off"]),
    ("clip-cov-ratio-zero", ["loss.clip_cov_ratio=0"], ["loss.clip_cov_ratio", "(0, 1]", "2e-4"]),
    ("kl-cov-ratio-above-1", ["loss.kl_cov_ratio=2"], ["loss.kl_cov_ratio", "(0, 1]"]),
    ("clip-cov-bounds-crossed", ["loss.clip_cov_lb=5", "loss.clip_cov_ub=1"], ["loss.clip_cov_ub", "above clip_cov_lb"]),
    ("negative-ppo-kl-coef", ["loss.ppo_kl_coef=-1"], ["loss.ppo_kl_coef", ">= 0"]),
    ("sapo-tau-zero", ["loss.tau_neg=0"], ["loss.tau_neg", "> 0", "tau_neg=1.05"]),
    ("replaced-key", ["advantage.norm_by_std=false"], ["advantage.norm_by_std", "did you mean advantage.estimator=drgrpo"]),
    ("accuracy-range-above-1", ["dynamic_sampling.accuracy_range=[0.2,1.5]"], ["dynamic_sampling.accuracy_range", "0 <= lo < hi <= 1"]),
    ("accuracy-range-below-0", ["dynamic_sampling.accuracy_range=[-0.1,0.9]"], ["dynamic_sampling.accuracy_range", "0 <= lo < hi <= 1"]),
    ("accuracy-range-lo-not-below-hi", ["dynamic_sampling.accuracy_range=[0.6,0.6]"], ["dynamic_sampling.accuracy_range", "[0, 1]"]),
    ("accuracy-range-one-bound", ["dynamic_sampling.accuracy_range=[0.5]"], ["dynamic_sampling.accuracy_range", "[lo, hi]"]),
    ("negative-min-reward-std", ["dynamic_sampling.min_reward_std=-0.1"], ["dynamic_sampling.min_reward_std", ">= 0"]),
    ("round-below-batch", ["prompts_per_step=8", "mini_batch_size=8", "dynamic_sampling.max_prompts_per_round=4"],
     ["dynamic_sampling.max_prompts_per_round", "below prompts_per_step=8"]),
    ("negative-surplus-age", ["dynamic_sampling.max_surplus_age=-1"], ["dynamic_sampling.max_surplus_age", ">= 0"]),
    ("margin-below-1", ["dynamic_sampling.oversample_margin=0.5"], ["dynamic_sampling.oversample_margin", ">= 1"]),
    ("unknown-criterion", ["dynamic_sampling.criterion=entropy"], ["dynamic_sampling.criterion", "accuracy", "reward_std"]),
    ("negative-retire", ["data.retire_solved_after=-2"], ["data.retire_solved_after", ">= 0"]),
    ("unsolved-weight-above-1", ["data.unsolved_weight=2"], ["data.unsolved_weight", "[0, 1]"]),
]


@pytest.mark.parametrize("overrides, needles", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_mistake_is_one_line_naming_the_key(tmp_path, capfd, overrides, needles):
    out = tmp_path / "run"
    rc, err = _train(capfd, *SMALL, f"output_dir={out}", *overrides)
    _assert_one_line_error(rc, err, *needles)
    assert not out.exists(), "a rejected config wrote to output_dir"


FILE_CASES = [
    ("yaml-syntax", "syntax.yaml", ["syntax.yaml", "invalid YAML at line 3", "fix the syntax"]),
    ("yaml-list", "list.yaml", ["list.yaml", "mapping of keys"]),
    ("yaml-unknown-key", "unknown.yaml", ["'stepz'", "did you mean 'steps'"]),
    ("yaml-section-scalar", "section.yaml", ["section.yaml", "'clip' is a section"]),
    ("yaml-missing", "nope.yaml", ["nope.yaml", "does not exist"]),
]


@pytest.mark.parametrize("name, needles", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_is_one_line_naming_the_file(tmp_path, capfd, files, name, needles):
    rc, err = _train(capfd, str(files / name), *SMALL, f"output_dir={tmp_path / 'run'}")
    _assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


# Inputs found bad only when loaded: model folders, datasets, reward functions.
LOAD_CASES = [
    ("model-missing", ["model.path={root}/nowhere"], ["model.path", "not a folder"]),
    ("model-without-config", ["model.path={root}/no_config"], ["model.path", "no config.json", "save_pretrained"]),
    ("model-broken-config", ["model.path={root}/broken_config"], ["model.path", "broken_config"]),
    ("model-weights-not-its-family", ["model.path={root}/qwen3_no_qnorm", "data.train=builtin:chain", "reward.function=chain"],
     ["model.path", "Qwen3 config", "model.layers.1.self_attn.q_norm.weight"]),
    ("train-data-missing", ["data.train={root}/nowhere.jsonl"], ["data.train", "does not exist"]),
    ("eval-data-missing", ["data.eval={root}/nowhere.jsonl"], ["data.eval", "does not exist"]),
    ("data-empty", ["data.train={root}/empty.jsonl"], ["data.train", "empty.jsonl", "no rows"]),
    ("data-malformed-json", ["data.train={root}/malformed.jsonl"], ["data.train", "line 1: malformed JSON", "JSON Lines"]),
    ("data-missing-fields", ["data.train={root}/fields.jsonl"], ["data.train", "missing field 'prompt'", "data.prompt_field"]),
    ("data-wrong-types", ["data.train={root}/types.jsonl"], ["data.train", "line 1: prompt field 'prompt' is a int"]),
    ("data-empty-prompts", ["data.train={root}/empty_prompts.jsonl"], ["data.train", "line 2: prompt field 'prompt' is empty"]),
    ("data-unknown-format", ["data.train={root}/data.txt"], ["data.train", "set data.format"]),
    ("reward-unimportable", ["reward.function=no_such_module_xyz:score"], ["reward.function", "no_such_module_xyz"]),
    ("reward-unknown-name", ["reward.function=nonsense"], ["reward.function", "unknown reward function 'nonsense'", "math"]),
]


@pytest.mark.parametrize("overrides, needles", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_unloadable_input_is_one_line_naming_the_key_and_file(tmp_path, capfd, cache, files, overrides, needles):
    out = tmp_path / "run"
    rc, err = _train(capfd, *SMALL, f"quickstart.cache_dir={cache}", f"output_dir={out}",
                     *(o.format(root=files) for o in overrides))
    _assert_one_line_error(rc, err, *needles)
    assert not out.exists(), "bad input wrote to output_dir"


# ----------------------------------------------------------------------------- output folders


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A folder that holds another run (its config, metrics and a result file)."""
    run = tmp_path / "existing"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: existing\nseed: 0\nsteps: 60\ngroup_size: 8\nprompts_per_step: 16\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/accuracy": 0.5}) + "\n")
    (run / "precious.txt").write_text("results of a week of training")
    return run


def test_folder_holding_a_run_is_refused_without_resume_or_overwrite(capfd, cache, existing_run):
    before = _snapshot(existing_run)
    rc, err = _train(capfd, *SMALL, f"quickstart.cache_dir={cache}", f"output_dir={existing_run}")
    _assert_one_line_error(rc, err, "output_dir", "already holds a run", "resume=true", "overwrite=true")
    assert _snapshot(existing_run) == before


def test_resume_with_different_settings_is_refused(capfd, cache, existing_run):
    before = _snapshot(existing_run)
    rc, err = _train(capfd, *SMALL, f"quickstart.cache_dir={cache}", f"output_dir={existing_run}", "resume=true")
    # The saved run used group_size=8 (and prompts_per_step=16); this one asks for 4.
    _assert_one_line_error(rc, err, "resume:", "was 8", "now 4", "overwrite=true")
    assert _snapshot(existing_run) == before


def test_overwrite_with_bad_data_removes_nothing(capfd, cache, files, existing_run):
    before = _snapshot(existing_run)
    rc, err = _train(capfd, *SMALL, f"quickstart.cache_dir={cache}", f"output_dir={existing_run}", "overwrite=true",
                     f"data.train={files}/malformed.jsonl")
    _assert_one_line_error(rc, err, "data.train", "malformed JSON")
    assert _snapshot(existing_run) == before


def test_output_dir_that_is_a_file_is_refused(tmp_path, capfd):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    rc, err = _train(capfd, *SMALL, f"output_dir={target}")
    _assert_one_line_error(rc, err, "output_dir", "is a file")
    assert target.read_text() == "not a folder"


# ----------------------------------------------------------------------------- the real command line


def test_real_command_line_exit_code_and_single_line(tmp_path, cache, files, existing_run):
    """Three cases through ``python -m dapo_rl.cli``, started together to share the import time."""
    cases = {
        "unknown-key": (["stepz=3"], ["'stepz'"]),
        "bad-dataset": ([f"data.train={files}/fields.jsonl"], ["data.train", "missing field 'prompt'"]),
        "holds-a-run": ([f"output_dir={existing_run}"], ["already holds a run"]),
    }
    before = _snapshot(existing_run)
    env = {**os.environ, "DAPO_RL_CACHE": cache, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dapo_rl.cli", "train", *SMALL, f"quickstart.cache_dir={cache}",
             f"output_dir={tmp_path / name}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        _assert_one_line_error(proc.returncode, stderr, *cases[name][1])
        assert stdout == "", f"{name}: nothing is printed on stdout when the input is bad"
    assert not (tmp_path / "unknown-key").exists() and not (tmp_path / "bad-dataset").exists()
    assert _snapshot(existing_run) == before


def test_micro_batch_size_left_unset_fits_any_mini_batch():
    # Unset, it is never the reason a valid mini-batch is refused: the largest divisor up to 128.
    from dapo_rl.config import default_micro_batch_size, load_config

    assert load_config().micro_batch_size == 128  # 16 prompts × 8 samples: the whole mini-batch
    assert load_config(overrides=["mini_batch_size=4"]).micro_batch_size == 32
    assert load_config(overrides=["group_size=25", "prompts_per_step=8", "mini_batch_size=8"]).micro_batch_size == 100
    assert [default_micro_batch_size(n) for n in (1, 7, 128, 256, 200, 131)] == [1, 7, 128, 128, 100, 1]
    assert load_config(overrides=["micro_batch_size=16"]).micro_batch_size == 16  # set: kept as given
