"""Multi-turn rollouts (rollout/multi_turn.py, tools/): token in and token out, tool calls and
their errors by kind, the trajectory's length budget, environments, and refusals at start."""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import pytest
import torch

from dapo_rl.rollout import RolloutEngine, Sample, SamplingParams
from dapo_rl.rollout.multi_turn import TRUNCATED_MARK, MultiTurnSampler, last_model_turn, trajectory_metrics
from dapo_rl.tools import TOOL_PARSERS, EnvironmentFailures, ToolCallError, hermes_tool_calls, load_tools, tool_from_function

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained in memory, with a ChatML template and merges such as
    ``ab``: re-tokenizing text across a turn boundary would change the ids."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = ["ab ab abab cab", '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>', "tool user assistant"] * 50
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    return tok


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def fails(x: int) -> int:
    """Always raises.

    Args:
        x: anything
    """
    raise RuntimeError("broken on purpose")


def slow(x: int) -> int:
    """Sleeps past the timeout.

    Args:
        x: anything
    """
    time.sleep(0.5)
    return x


def undocumented(x):
    return x


class Scripted(RolloutEngine):
    """Replies turn k of every trajectory with ``turns[k]`` (ids), log-prob -0.5 per token; counts
    the model turns a context already holds by its assistant headers."""

    def __init__(self, tok, turns: list[list[int]], stop_at_eos: bool = True):
        self.tok, self.turns, self.contexts = tok, turns, []

    @classmethod
    def from_config(cls, config, model, tokenizer):  # pragma: no cover - not built from a config here
        raise NotImplementedError

    def sync_weights(self, model) -> None:  # pragma: no cover
        pass

    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        header = self.tok.convert_tokens_to_ids("<|im_start|>")
        out = []
        for p in prompts:
            self.contexts.append(list(p))
            k = min((p.count(header) - 2) // 2, len(self.turns) - 1)  # user + assistant, then tool + assistant per turn
            ids = self.turns[k][: params.max_new_tokens]
            finish = "stop" if ids and ids[-1] == self.tok.eos_token_id else "length"
            out.append([Sample(list(p), list(ids), finish, logprobs=[-0.5] * len(ids)) for _ in range(n)])
        return out


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _prompt(tok) -> list[int]:
    return _ids(tok, tok.apply_chat_template([{"role": "user", "content": "add 2 and 3"}], tokenize=False, add_generation_prompt=True))


def test_a_tool_call_trajectory_is_token_in_token_out(bpe):
    call = _ids(bpe, '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') + [bpe.eos_token_id]
    answer = _ids(bpe, "ab") + [bpe.eos_token_id]
    engine = Scripted(bpe, [call, answer])
    sampler = MultiTurnSampler(engine, bpe, tools=[tool_from_function(add)], parser=hermes_tool_calls, max_turns=3)
    prompt = _prompt(bpe)
    [[s]] = sampler.generate([prompt], 1, SamplingParams(max_new_tokens=200))
    glue = _ids(bpe, "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")
    assert s.response_ids == call + glue + answer  # the model's ids as sampled; the message's as rendered
    assert s.model_mask == [1] * len(call) + [0] * len(glue) + [1] * len(answer)
    assert s.logprobs == [-0.5] * len(call) + [0.0] * len(glue) + [-0.5] * len(answer)
    assert engine.contexts[1] == prompt + call + glue  # the second turn continues the first, ids as they were
    assert s.trajectory.turns == 2 and s.trajectory.tool_calls == 1 and not s.trajectory.tool_errors
    assert last_model_turn(s) == answer and s.finish_reason == "stop"
    # The whole conversation is a prefix-extension of the rendered chat: its text is the template's.
    text = bpe.decode(prompt + s.response_ids)
    assert text == bpe.apply_chat_template([{"role": "user", "content": "add 2 and 3"},
                                            {"role": "assistant", "content": bpe.decode(call[:-1])},
                                            {"role": "tool", "content": "5"},
                                            {"role": "assistant", "content": "ab"}], tokenize=False).rstrip("\n")


def test_the_models_tokens_are_never_re_tokenized(bpe):
    """The model sampled ``a`` and ``b`` as two tokens: they stay two, although the tokenizer would
    merge their text into one (a re-tokenizing driver fails here)."""
    a, b = _ids(bpe, "a"), _ids(bpe, "b")
    assert len(_ids(bpe, "ab")) == 1 and _ids(bpe, "ab") != a + b  # the merge exists
    first = a + b + _ids(bpe, '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') + [bpe.eos_token_id]
    engine = Scripted(bpe, [first, a + b + [bpe.eos_token_id]])
    sampler = MultiTurnSampler(engine, bpe, tools=[tool_from_function(add)], parser=hermes_tool_calls)
    prompt = _prompt(bpe)
    [[s]] = sampler.generate([prompt], 1, SamplingParams(max_new_tokens=200))
    assert s.response_ids[: len(first)] == first
    assert s.response_ids[-3:] == a + b + [bpe.eos_token_id]
    assert _ids(bpe, bpe.decode(prompt + s.response_ids)) != prompt + s.response_ids  # re-tokenizing would drift


@pytest.mark.parametrize("text, kind", [
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "unknown_tool"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "fails", "arguments": {"x": 1}}</tool_call>', "exception"),
    ('<tool_call>{"name": "slow", "arguments": {"x": 1}}</tool_call>', "timeout"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, </tool_call>', "parse_error"),
    ('<tool_call>{"name": "add"', "parse_error"),
])
def test_a_failed_call_is_an_observation_counted_by_kind(bpe, text, kind):
    turn = _ids(bpe, text) + [bpe.eos_token_id]
    engine = Scripted(bpe, [turn, _ids(bpe, "ab") + [bpe.eos_token_id]])
    tools = [tool_from_function(f) for f in (add, fails, slow)]
    sampler = MultiTurnSampler(engine, bpe, tools=tools, parser=hermes_tool_calls, tool_timeout_s=0.1)
    [[s]] = sampler.generate([_prompt(bpe)], 1, SamplingParams(max_new_tokens=200))
    assert s.trajectory.tool_errors == {kind: 1}
    environment = [t for t, m in zip(s.response_ids, s.model_mask) if m == 0]
    assert "error:" in bpe.decode(environment) and s.trajectory.turns == 2  # the model saw it and answered
    metrics = trajectory_metrics([s])
    assert metrics[f"rollout/tool_errors/{kind}"] == 1.0 and metrics["rollout/turns_mean"] == 2.0


def test_the_budget_covers_the_whole_trajectory_and_long_results_are_cut(bpe):
    call = _ids(bpe, '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') + [bpe.eos_token_id]
    engine = Scripted(bpe, [call, _ids(bpe, "ab ab ab ab") + [bpe.eos_token_id]])
    sampler = MultiTurnSampler(engine, bpe, tools=[tool_from_function(add)], parser=hermes_tool_calls)
    budget = len(call) + 12  # room for the message, and a few tokens of the answer
    [[s]] = sampler.generate([_prompt(bpe)], 1, SamplingParams(max_new_tokens=budget))
    assert len(s.response_ids) <= budget and s.finish_reason == "length" and s.truncated
    # A tool result longer than max_tool_response_tokens is cut, and the model sees that it was.
    echo = tool_from_function(slow)
    long_engine = Scripted(bpe, [_ids(bpe, '<tool_call>{"name": "slow", "arguments": {"x": 123456789012345}}</tool_call>')
                                 + [bpe.eos_token_id], [bpe.eos_token_id]])
    cut = MultiTurnSampler(long_engine, bpe, tools=[echo], parser=hermes_tool_calls, max_tool_response_tokens=2, tool_timeout_s=5)
    [[s]] = cut.generate([_prompt(bpe)], 1, SamplingParams(max_new_tokens=300))
    message = bpe.decode([t for t, m in zip(s.response_ids, s.model_mask) if m == 0])
    assert TRUNCATED_MARK.strip() in message and "123456789012345" not in message


def test_max_turns_bounds_the_models_turns(bpe):
    call = _ids(bpe, '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') + [bpe.eos_token_id]
    engine = Scripted(bpe, [call])  # calls the tool forever
    sampler = MultiTurnSampler(engine, bpe, tools=[tool_from_function(add)], parser=hermes_tool_calls, max_turns=3)
    [[s]] = sampler.generate([_prompt(bpe)], 1, SamplingParams(max_new_tokens=1000))
    assert s.trajectory.turns == 3 and s.trajectory.tool_calls == 3


class Counter:
    """Asks the model to say 'ab' twice; rewards 1 if it did."""

    def reset(self, row):
        self.said, self.answer = 0, row["answer"]
        return None

    def step(self, text):
        self.said += "ab" in text
        return ("again", False) if self.said < 2 else (None, True)

    def reward(self):
        return 1.0 if self.said >= 2 else -1.0


class Broken:
    def reset(self, row):
        return None

    def step(self, text):
        raise ValueError("environment bug")


def test_an_environment_drives_the_turns_and_gives_the_reward(bpe):
    engine = Scripted(bpe, [_ids(bpe, "ab") + [bpe.eos_token_id]])
    sampler = MultiTurnSampler(engine, bpe, environment=Counter, max_turns=5)
    groups = sampler.generate([_prompt(bpe)], 2, SamplingParams(max_new_tokens=100), rows=[{"answer": "x"}])
    for s in groups[0]:
        assert s.trajectory.turns == 2 and s.trajectory.environment_reward == 1.0
        assert bpe.decode([t for t, m in zip(s.response_ids, s.model_mask) if m == 0]).count("again") == 1


def test_failing_environments_end_their_trajectory_then_stop_the_run(bpe):
    engine = Scripted(bpe, [_ids(bpe, "ab") + [bpe.eos_token_id]])
    sampler = MultiTurnSampler(engine, bpe, environment=Broken, max_environment_failures=3)
    [[s, t]] = sampler.generate([_prompt(bpe)], 2, SamplingParams(max_new_tokens=100))
    assert s.trajectory.environment_failed and t.trajectory.environment_failed
    with pytest.raises(EnvironmentFailures, match="rollout.max_environment_failures"):
        sampler.generate([_prompt(bpe)], 2, SamplingParams(max_new_tokens=100))


def test_tools_need_hints_and_a_docstring_and_parsers_are_a_registry():
    with pytest.raises(ValueError, match="undocumented"):
        tool_from_function(undocumented)
    [tool] = load_tools(["tests.test_multi_turn:add"])
    assert tool.schema["function"]["parameters"]["required"] == ["a", "b"]
    with pytest.raises(ValueError, match="cannot import tool"):
        load_tools(["tests.nowhere:add"])
    assert TOOL_PARSERS.get("hermes") is hermes_tool_calls
    assert hermes_tool_calls("no call here") == []
    with pytest.raises(ToolCallError):
        hermes_tool_calls("<tool_call>[1, 2]</tool_call>")
    assert [c.name for c in hermes_tool_calls('<tool_call>{"name": "a"}</tool_call> and <tool_call>{"name": "b"}</tool_call>')] == ["a", "b"]


@pytest.mark.parametrize("overrides, needle", [
    (["rollout.tools=[tests.test_multi_turn:undocumented]"], "rollout.tools: tool undocumented needs type hints"),
    (["rollout.tools=[tests.nowhere:f]"], "rollout.tools: cannot import tool"),
    (["rollout.environment=tests.test_multi_turn:add"], "rollout.environment: environment 'tests.test_multi_turn:add' is not a class"),
    (["rollout.environment=tests.test_multi_turn:Sample"], "has no reset() method"),
    (["rollout.tools=[tests.test_multi_turn:add]", "rollout.tool_parser=nope"], "rollout.tool_parser: unknown tool-call parser"),
])
def test_bad_tools_and_environments_are_refused_before_anything_is_written(tmp_path, capfd, monkeypatch, overrides, needle):
    from pathlib import Path

    from dapo_rl.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", f"output_dir={out}", *overrides]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


class SayEquals:
    """For the built-in chain model: after its first answer the environment writes '=' and lets it
    answer again; the reward is whether the last answer's digit is right."""

    def reset(self, row):
        self.answer, self.turns, self.last = row["answer"], 0, ""
        return None

    def step(self, text):
        self.turns += 1
        self.last = text
        return ("=", False) if self.turns < 2 else (None, True)

    def reward(self):
        return 1.0 if self.last.rstrip().endswith(f"#{self.answer}") else -1.0


def test_dapo_train_runs_an_environment_end_to_end(tmp_path, quickstart_cache, monkeypatch):
    from pathlib import Path

    from dapo_rl.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", f"quickstart.cache_dir={quickstart_cache}", "steps=2", "prompts_per_step=4",
                 "mini_batch_size=4", "group_size=4", "data.eval=null", "logging.progress=false", "rollout.max_response_length=32",
                 "overlong.cache_length=8", "rollout.environment=tests.test_multi_turn:SayEquals"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/turns_mean"] > 1.0 and r["rollout/environment_token_frac"] > 0.0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)


TOOLS_CHATML = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}" + CHATML)


def test_prompts_show_the_tools_through_the_chat_template(bpe, tmp_path):
    import copy

    from dapo_rl.data import Example, TemplateError, render_prompt
    from dapo_rl.data.templates import use_chat_template_file

    schemas = [tool_from_function(add).schema]
    example = Example("add 2 and 3", "5")
    with pytest.raises(TemplateError, match="data.chat_template"):  # ChatML above ignores tools=
        render_prompt(example, "chat", bpe, tools=schemas)
    tok = copy.deepcopy(bpe)
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_CHATML)
    use_chat_template_file(tok, str(template))
    text = render_prompt(example, "chat", tok, tools=schemas)
    assert text.startswith("<|im_start|>system\nTools: ") and '"name": "add"' in text and text.endswith("<|im_start|>assistant\n")
    assert render_prompt(example, "chat", tok) == render_prompt(example, "chat", bpe)  # no tools: as before
    with pytest.raises(TemplateError, match="data.chat_template: cannot read"):
        use_chat_template_file(tok, str(tmp_path / "missing.jinja"))


def test_dapo_eval_takes_the_same_multi_turn_keys(tmp_path, quickstart_model, monkeypatch):
    from pathlib import Path

    from dapo_rl.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "eval.json"
    assert main(["eval", quickstart_model, "builtin:chain", "environment=tests.test_multi_turn:SayEquals", "k=2", "max_rows=8",
                 "greedy=false", "max_response_length=32", "progress=false", f"output={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["num_problems"] == 8 and result["trajectory"]["rollout/turns_mean"] > 1.0
    assert main(["eval", quickstart_model, "builtin:chain", "tools=[tests.test_multi_turn:undocumented]", "progress=false"]) == 2


class AlwaysBroken:
    def reset(self, row):
        raise RuntimeError("cannot start")

    def step(self, text):  # pragma: no cover - never reached
        return None, True


def test_a_run_whose_environments_keep_failing_stops_with_one_line_after_a_checkpoint(tmp_path, quickstart_cache, capfd, monkeypatch):
    from pathlib import Path

    from dapo_rl.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "run"
    capfd.readouterr()
    rc = main(["train", f"output_dir={out}", f"quickstart.cache_dir={quickstart_cache}", "steps=3", "prompts_per_step=4",
               "mini_batch_size=4", "group_size=4", "data.eval=null", "logging.progress=false",
               "rollout.environment=tests.test_multi_turn:AlwaysBroken", "rollout.max_environment_failures=10"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "rollout.max_environment_failures" in err[0] and "resume=true" in err[0], err
    assert (out / "checkpoints").is_dir()


def test_multi_turn_runs_resume_exactly(tmp_path, quickstart_cache, monkeypatch):
    """Two steps straight, or one step, a stop, and a resume: the same final weights."""
    import hashlib
    from pathlib import Path

    from dapo_rl.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    common = [f"quickstart.cache_dir={quickstart_cache}", "prompts_per_step=4", "mini_batch_size=4", "group_size=4",
              "data.eval=null", "logging.progress=false", "rollout.max_response_length=32", "overlong.cache_length=8",
              "rollout.environment=tests.test_multi_turn:SayEquals", "checkpoint.interval=1"]
    assert main(["train", f"output_dir={tmp_path / 'straight'}", "steps=2", *common]) == 0
    assert main(["train", f"output_dir={tmp_path / 'split'}", "steps=1", *common]) == 0
    assert main(["train", f"output_dir={tmp_path / 'split'}", "steps=2", "resume=true", *common]) == 0

    def digest(run: str) -> str:
        return hashlib.sha256((tmp_path / run / "final" / "model.safetensors").read_bytes()).hexdigest()

    assert digest("straight") == digest("split")


def test_the_python_tool_runs_code_in_a_limited_subprocess(monkeypatch):
    from dapo_rl.tools.python import python, run_python

    monkeypatch.setenv("DAPO_SECRET_FOR_TEST", "leak")
    assert python("print(12345 * 6789)") == "83810205"
    run = run_python("import os; print(sorted(os.environ)); print(os.getcwd())")
    assert run.ok and "DAPO_SECRET_FOR_TEST" not in run.output and "dapo-python-tool-" in run.output
    slow = run_python("while True: pass", timeout_s=0.5)
    assert not slow.ok and slow.problem == "timeout"
    loud = run_python("while True: print('x' * 1000)", max_output_kb=4)
    assert not loud.ok and loud.problem == "output limit" and len(loud.output) <= 4 * 1024
    big = run_python("x = bytearray(2 * 1024 ** 3)", max_memory_mb=256)
    assert not big.ok and "MemoryError" in big.output
    failed = run_python("raise ValueError('bad input')")
    assert not failed.ok and "ValueError: bad input" in failed.text and failed.problem == "exit status 1"
    [tool] = load_tools(["dapo_rl.tools.python:python"])
    assert tool.schema["function"]["parameters"]["required"] == ["code"]
