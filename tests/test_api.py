"""The Python API (``DAPOTrainer``, ``DAPOConfig``) and the configuration from the command line
(``dapo train --help``, ``dapo config``)."""

from __future__ import annotations

import dataclasses

import pytest

from dapo_rl.cli import main
from dapo_rl.config import Config, load_config
from dapo_rl.config_reference import config_keys


def _value_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            yield from _value_keys(type(value), prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_every_key_has_a_description_and_appears_in_train_help(capsys):
    rows = {row.key: row for row in config_keys()}
    assert set(_value_keys()) <= set(rows)
    assert [key for key, row in rows.items() if not row.description] == []
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in _value_keys():
        assert f"  {key}=" in text, key
    # The default and the comment of a key, both from config.py.
    assert "  clip.eps_high=0.28" in text and "Clip-Higher" in text
    assert "  dynamic_sampling.max_rounds=8" in text


def test_dapo_config_prints_yaml_that_loads_back_to_the_same_config(tmp_path, capsys):
    assert main(["config", "steps=3", "clip.eps_high=0.3", "rollout.max_response_length=12"]) == 0
    text = capsys.readouterr().out
    saved = tmp_path / "run.yaml"
    saved.write_text(text)
    assert load_config(saved) == load_config(None, ["steps=3", "clip.eps_high=0.3", "rollout.max_response_length=12"])
    assert main(["config", str(saved), "seed=4"]) == 0
    assert "seed: 4" in capsys.readouterr().out


def test_dapo_config_refuses_a_typo_in_one_line(capsys):
    assert main(["config", "clip.eps_hihg=0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'clip.eps_high'" in err
