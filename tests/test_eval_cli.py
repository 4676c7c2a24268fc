"""``dapo eval``: options, output file handling, and the numbers it reports (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dapo_rl.cli import main
from dapo_rl.config import ConfigError
from dapo_rl.data import DatasetError
from dapo_rl.data.synthetic import VOCAB
from dapo_rl.evaluation.evaluate_model import (
    dataset_name,
    default_output,
    parse_options,
    run_eval,
    write_json_atomic,
)
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rewards.registry import register_reward

FAST = ["k=2", "max_response_length=4", "progress=false"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with the chain task's character tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _row_flag_reward(response: str, ground_truth: str, metadata: dict) -> bool:
    """Correct exactly when the dataset row says so: makes the expected accuracy known in advance."""
    return bool(metadata.get("ok"))


register_reward("test-row-flag", _row_flag_reward, overwrite=True)


def _write_rows(path: Path, flags: list[bool]) -> Path:
    rows = [{"prompt": f"{i}{i}.=", "answer": str(i % 10), "ok": flag} for i, flag in enumerate(flags)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_numbers_match_known_correctness(model_dir, tmp_path, capsys):
    # 3 of 4 problems always correct, whatever the model says: every metric is exactly 0.75
    data = _write_rows(tmp_path / "flags.jsonl", [True, False, True, True])
    out = tmp_path / "result.json"
    assert run_eval(str(model_dir), str(data), FAST + ["reward=test-row-flag", f"output={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["num_problems"] == 4 and result["k"] == 2
    assert result["correct_counts"] == [2, 0, 2, 2]
    assert result["greedy_accuracy"] == pytest.approx(0.75)
    assert result["avg_at_k"] == pytest.approx(0.75)
    assert result["pass_at_k"] == {"1": pytest.approx(0.75), "2": pytest.approx(0.75)}
    assert 1 <= result["response_length_mean"] <= 4
    table = capsys.readouterr().out
    assert "pass@2" in table and "0.7500" in table and str(out) in table


def test_builtin_chain_defaults_to_model_folder_and_refuses_overwrite(model_dir, capsys):
    args = FAST + ["builtin_eval_size=6", "k=3"]
    assert run_eval(str(model_dir), "builtin:chain", args) == 0
    path = model_dir / "eval-chain.json"
    first = json.loads(path.read_text())
    assert first["num_problems"] == 6 and first["k"] == 3
    assert all(0 <= c <= 3 for c in first["correct_counts"])
    # unbiased pass@1 equals avg@k; pass@k never decreases with k
    assert first["pass_at_k"]["1"] == pytest.approx(first["avg_at_k"])
    assert first["pass_at_k"]["1"] <= first["pass_at_k"]["2"] <= first["pass_at_k"]["3"]
    with pytest.raises(ConfigError, match="overwrite=true"):
        run_eval(str(model_dir), "builtin:chain", args)
    assert run_eval(str(model_dir), "builtin:chain", args + ["overwrite=true", "seed=1"]) == 0
    assert json.loads(path.read_text())["options"]["seed"] == 1
    assert not list(model_dir.glob(".*.tmp"))  # no staging file left behind


def test_same_seed_same_result(model_dir, tmp_path):
    outs = []
    for name in ("a.json", "b.json"):
        run_eval(str(model_dir), "builtin:chain", FAST + ["builtin_eval_size=5", "k=4", "max_response_length=6",
                                                          f"output={tmp_path / name}"])
        outs.append(json.loads((tmp_path / name).read_text()))
    assert outs[0]["correct_counts"] == outs[1]["correct_counts"]
    assert outs[0]["response_length_mean"] == outs[1]["response_length_mean"]


def test_builtin_model_with_short_warmup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # built-in models write their result to ./
    args = FAST + ["builtin_eval_size=4", "quickstart.warmup_steps=3", "quickstart.warmup_batch=4",
                   "quickstart.hidden_size=16", "quickstart.num_layers=1", f"quickstart.cache_dir={tmp_path / 'cache'}"]
    assert run_eval("builtin:chain-tiny", "builtin:chain", args) == 0
    result = json.loads((tmp_path / "eval-chain-tiny-chain.json").read_text())
    assert result["num_problems"] == 4
    assert any((tmp_path / "cache").iterdir())  # the model was built into the given cache, not ~/.cache


@pytest.mark.parametrize(
    ("override", "key"),
    [("nosuchkey=1", "nosuchkey"), ("k=0", "k"), ("top_p=0", "top_p"), ("template=fancy", "template"),
     ("k=two", "k"), ("quickstart.bogus=1", "quickstart.bogus"), ("k=3 ", None)],
)
def test_bad_options_name_the_key(override, key):
    if key is None:  # a stray space in a value is still a valid int; the parser must accept it
        assert parse_options([override]).k == 3
        return
    with pytest.raises(ConfigError) as info:
        parse_options([override])
    message = str(info.value)
    assert key in message and "\n" not in message


def test_samples_per_prompt_is_an_alias_of_k():
    assert parse_options(["samples_per_prompt=8"]).k == 8
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        parse_options(["k=2", "samples_per_prompt=8"])


def test_cli_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys):
    assert main(["eval", str(model_dir), "builtin:chain", "nosuchkey=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nosuchkey" in err and len(err.splitlines()) == 1
    assert main(["eval", str(tmp_path / "missing-model"), "builtin:chain", *FAST]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert main(["eval", str(model_dir), str(tmp_path / "missing.jsonl"), *FAST]) == 2
    assert "DATA" in capsys.readouterr().err


def test_dataset_without_usable_rows_is_an_error(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(DatasetError):
        run_eval(str(model_dir), str(bad), FAST + [f"output={tmp_path / 'x.json'}"])
    assert not (tmp_path / "x.json").exists()


def test_max_rows_limits_problems(model_dir, tmp_path):
    data = _write_rows(tmp_path / "flags.jsonl", [True] * 6)
    out = tmp_path / "r.json"
    run_eval(str(model_dir), str(data), FAST + ["max_rows=2", "reward=test-row-flag", f"output={out}"])
    assert json.loads(out.read_text())["num_problems"] == 2


def test_output_names():
    assert dataset_name("builtin:chain") == "chain"
    assert dataset_name("data/arith-eval.jsonl") == "arith-eval"
    assert dataset_name("data/gsm8k_test/") == "gsm8k_test"
    assert default_output("models/smol", "d/test.parquet") == Path("models/smol/eval-test.json")
    assert default_output("builtin:chain-tiny", "builtin:chain") == Path("eval-chain-tiny-chain.json")


def test_write_json_atomic_refuses_then_overwrites(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1}, overwrite=False)
    with pytest.raises(ConfigError, match="already exists"):
        write_json_atomic(path, {"a": 2}, overwrite=False)
    assert json.loads(path.read_text()) == {"a": 1}
    write_json_atomic(path, {"a": 3}, overwrite=True)
    assert json.loads(path.read_text()) == {"a": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
