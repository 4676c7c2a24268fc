"""The calculator tool and the built-in calculator task (``builtin:calculator``): the tool's values
and refusals, the task's problems and splits, its warm-up data (every call it shows parses and gets
what the real tool returns), the settings the task brings, and, in the slow suite, RL teaching the
warmed-up tiny model to use the tool from an empty cache."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from dapo_rl.config import ConfigError, load_config
from dapo_rl.data.builtin_tasks import BUILTIN_TASKS, builtin_task
from dapo_rl.data.calculator import CALCULATOR, tool_call
from dapo_rl.models.quickstart import builtin_model_task
from dapo_rl.models.tiny import build_char_tokenizer
from dapo_rl.rewards.registry import resolve_reward_fn
from dapo_rl.tools import hermes_tool_calls, load_tools
from dapo_rl.tools.calculator import calculator


@pytest.mark.parametrize("expression, value", [
    ("347+81+295", "723"), ("2*(3+4)", "14"), ("7/2", "3.5"), ("-3**2", "-9"), ("10//3", "3"), ("10 % 4", "2"),
    ("1/3", "0.3333333333"), ("6/3", "2"), ("2**-1", "0.5"),
])
def test_calculator_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os')", "unsupported syntax"), ("2+", "cannot parse"), ("x+1", "unsupported syntax"),
    ("2**100000", "exponent"), ("9**60*9**60", "more than 60 digits"), ("'a'*3", "unsupported syntax"),
])
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression, error):
    with pytest.raises(ValueError, match=error):
        calculator(expression)


def test_calculator_division_by_zero_is_an_observation_not_a_crash():
    (tool,) = load_tools(["dapo_rl.tools.calculator:calculator"])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        result = tool.call({"expression": "1/0"}, 5.0, pool)
        good = tool.call({"expression": "1+2"}, 5.0, pool)
    assert result.error == "exception" and "ZeroDivisionError" in result.text
    assert good.error is None and good.text == "3"
    assert tool.schema["function"]["name"] == "calculator"
    assert tool.schema["function"]["parameters"]["required"] == ["expression"]


def test_problems_have_a_fixed_width_and_disjoint_splits():
    train, held_out = CALCULATOR.splits(2000, 256)
    assert (len(train), len(held_out)) == (2000, 256)
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert CALCULATOR.splits(10, 256)[1] == held_out  # the held-out set does not depend on the train size
    for e in held_out:
        terms = e.metadata["terms"]
        assert len(e.prompt) == CALCULATOR.width + 1 and e.prompt.endswith("=")
        assert len(terms) == CALCULATOR.terms and all(10 <= t < 1000 for t in terms)
        assert e.prompt.rstrip("=").rstrip(".") == "+".join(map(str, terms)) and e.answer == str(sum(terms))


def test_warmup_calls_parse_and_get_what_the_tool_returns():
    """Every call the warm-up shows is one the hermes parser reads, and the result that follows it
    is the real tool's answer, so the model is taught on what rollouts will show it."""
    rng = random.Random(0)
    tokenizer = build_char_tokenizer(CALCULATOR.vocab, CALCULATOR.words)
    kinds = Counter()
    for _ in range(2000):
        segments = CALCULATOR.warmup_segments(rng)
        prompt = segments[0][0]
        terms = [int(t) for t in prompt.rstrip("=").rstrip(".").split("+")]
        assert [trained for _, trained in segments][0] is False
        for text, _ in segments:
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # in the vocabulary
        if len(segments) == 2:  # in its head: the true sum
            assert segments[1] == (f"#{sum(terms)}", True)
            kinds["head"] += 1
            continue
        (_, _), (call, c), (result, r), (answer, a) = segments
        assert (c, r, a) == (True, False, True)
        (parsed,) = hermes_tool_calls(call)
        assert parsed.name == "calculator" and result == calculator(**parsed.arguments) and answer == f"#{result}"
        kinds["good" if parsed.arguments["expression"] == "+".join(map(str, terms)) else "bad"] += 1
    calls = kinds["good"] + kinds["bad"]
    assert abs(calls / 2000 - CALCULATOR.tool_rate) < 0.04
    assert abs(kinds["bad"] / calls - CALCULATOR.bad_call_rate) < 0.05
    assert tool_call("1+2") == '<tool_call>{"name":"calculator","arguments":{"expression":"1+2"}}</tool_call>'


def test_the_tokenizer_has_one_token_per_fixed_piece_of_a_call_and_one_per_digit():
    tokenizer = build_char_tokenizer(CALCULATOR.vocab, CALCULATOR.words)
    text = tool_call("347+81+295") + "#723"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) == 4 + len("347+81+295") + len("#723")  # <tool_call>, the JSON head, '"}}', </tool_call>
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<tool_call>", '{"name":"calculator","arguments":{"expression":"']
    # Without words it is the character tokenizer the chain tasks use (their models are unchanged).
    plain = build_char_tokenizer(CALCULATOR.vocab)
    assert len(plain(text, add_special_tokens=False)["input_ids"]) == len(text)


def test_the_task_is_registered_with_its_model_and_reward():
    assert builtin_task("builtin:calculator") is CALCULATOR is BUILTIN_TASKS["calculator"]
    assert builtin_model_task("builtin:calculator-tiny") is CALCULATOR
    assert resolve_reward_fn("auto", data="builtin:calculator").name == "last_number"


def test_a_builtin_task_brings_its_settings_and_the_user_overrides_them(tmp_path):
    c = load_config(overrides=["data.train=builtin:calculator"])
    assert (c.model.path, c.data.eval) == ("builtin:calculator-tiny", "builtin:calculator")
    assert c.rollout.tools == ["dapo_rl.tools.calculator:calculator"] and c.rollout.max_response_length == 64 and c.steps == 80
    given = tmp_path / "run.yaml"
    given.write_text("model:\n  path: some/folder\nrollout:\n  max_turns: 2\n")
    c = load_config(given, ["data.train=builtin:calculator", "data.eval=null"])
    assert (c.model.path, c.rollout.max_turns, c.data.eval) == ("some/folder", 2, None)
    assert c.rollout.tools == ["dapo_rl.tools.calculator:calculator"]
    # The chain-long task picks its own model too; the quickstart's defaults are unchanged.
    assert load_config(overrides=["data.train=builtin:chain-long"]).model.path == "builtin:chain-long-tiny"
    default = load_config()
    assert (default.model.path, default.data.eval, default.rollout.tools) == ("builtin:chain-tiny", "builtin:chain", [])
    with pytest.raises(ConfigError, match="rollout.max_turns"):
        load_config(overrides=["data.train=builtin:calculator", "rollout.max_turns=0"])


@pytest.mark.slow
def test_rl_teaches_the_tiny_model_to_use_the_calculator_from_an_empty_cache(tmp_path, monkeypatch, capsys):
    """The issue's bar, as a user runs it: ``dapo train data.train=builtin:calculator`` from an empty
    cache at the default thread count goes from at most 50% to at least 90% held-out accuracy, and
    calls the tool on almost every problem after training."""
    from dapo_rl.cli import main

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "data.train=builtin:calculator", f"output_dir={out}", "logging.progress=false"]) == 0
    assert "held-out tool calls per trajectory: " in capsys.readouterr().out
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
    before, after = evals[0], evals[-1]
    assert before["eval/accuracy"] <= 0.5 and after["eval/accuracy"] >= 0.9
    assert before["eval/tool_calls_mean"] < 0.6 and after["eval/tool_calls_mean"] > 0.9
