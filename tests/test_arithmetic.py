"""The arithmetic word-problem generator: deterministic, correct answers, loadable rows."""

from __future__ import annotations

import json
import re

import pytest

from dapo_rl.data import DatasetSpec, load_examples
from dapo_rl.data.arithmetic import LEVELS, SHORT_INSTRUCTION, generate, main


def _recompute(prompt: str) -> int:
    """Re-derive the answer from the wording, independently of make_problem."""
    n = [int(x) for x in re.findall(r"\d+", prompt.split("\n")[0])]
    if "boxes with" in prompt:
        return n[0] * n[1]
    if "bags with" in prompt:
        return n[0] * n[1] + n[2]
    if "gives away" in prompt:
        return n[0] - n[1]
    return sum(n)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_are_right_and_rows_distinct(level):
    rows = generate(300, seed=3, level=level)
    assert len({r["prompt"] for r in rows}) == 300
    for row in rows:
        assert int(row["answer"]) == _recompute(row["prompt"]) >= 0


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate(50, 0, 2) == generate(50, 0, 2)
    assert generate(50, 0, 2) != generate(50, 1, 2)


def test_short_instruction_is_appended():
    rows = generate(5, 0, 1, instruction="short")
    assert all(r["prompt"].endswith(SHORT_INSTRUCTION) and "Answer: $Answer" in r["prompt"] for r in rows)
    with pytest.raises(ValueError, match="instruction"):
        generate(5, 0, 1, instruction="long")


def test_cli_writes_loadable_jsonl_excluding_eval(tmp_path):
    ev, tr = tmp_path / "eval.jsonl", tmp_path / "train.jsonl"
    assert main([str(ev), "--num", "20", "--seed", "1", "--level", "1"]) == 0
    assert main([str(tr), "--num", "100", "--seed", "0", "--level", "1", "--exclude", str(ev)]) == 0
    eval_prompts = {json.loads(line)["prompt"] for line in ev.read_text().splitlines()}
    loaded = load_examples(DatasetSpec(path=str(tr), preset="plain"))
    assert len(loaded.examples) == 100 and not loaded.skipped
    assert not eval_prompts & {e.prompt for e in loaded.examples}
    assert main([str(tmp_path / "x.jsonl"), "--level", "9"]) == 2
