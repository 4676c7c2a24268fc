"""Tests for dataset loading (``dapo_rl.data.datasets``) and prompt templates (``dapo_rl.data.templates``).

Every file is written by the tests into ``tmp_path``; nothing is downloaded. Parquet and Hugging
Face ``datasets`` tests skip (with the reason shown under ``-ra``) when those optional libraries
are missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from dapo_rl.data.datasets import (
    FORMATS,
    PRESETS,
    DatasetError,
    DatasetSpec,
    Example,
    LoadResult,
    RowError,
    RowProblem,
    example_from_row,
    load_examples,
)
from dapo_rl.data.templates import (
    DAPO_INSTRUCTION,
    GSM8K_INSTRUCTION,
    TEMPLATES,
    TemplateError,
    apply_instruction,
    render_messages,
    render_prompt,
)

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAVE_DATASETS = importlib.util.find_spec("datasets") is not None
needs_pyarrow = pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow not installed: Parquet loading not tested")
needs_datasets = pytest.mark.skipif(
    not HAVE_DATASETS, reason="Hugging Face 'datasets' not installed: save_to_disk / load_dataset loading not tested"
)

DAPO_EXPECTED = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "What is 1+1?\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


# --------------------------------------------------------------------------------------------
# Fixture rows and writers
# --------------------------------------------------------------------------------------------


def plain_rows() -> list[dict[str, Any]]:
    return [
        {"prompt": "What is 1+1?", "answer": "2", "difficulty": "easy"},
        {"prompt": "What is 2*3?", "answer": "6", "difficulty": "easy"},
    ]


def gsm8k_rows() -> list[dict[str, Any]]:
    return [
        {"question": "Natalia sold 48 clips and then 24. How many?", "answer": "48+24 = <<48+24=72>>72\n#### 72"},
        {"question": "How much is 1080 dollars?", "answer": "It is.\n#### 1,080"},
    ]


def dapo_prompt(problem: str) -> str:
    return DAPO_INSTRUCTION.format(problem=problem)


def dapo_rows() -> list[dict[str, Any]]:
    """Rows shaped like BytedTsinghua-SIA/DAPO-Math-17k (prompts ship with the instruction)."""
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": dapo_prompt("Find x if 2x = 34."), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": "17", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "a1b2"},
        },
        {
            "data_source": "math_dapo",
            "prompt": [{"content": dapo_prompt("Compute 3^2."), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": "9", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "c3d4"},
        },
    ]


ROWS_BY_PRESET = {"plain": plain_rows, "gsm8k": gsm8k_rows, "dapo-math": dapo_rows}
EXPECTED_ANSWERS = {"plain": ["2", "6"], "gsm8k": ["72", "1080"], "dapo-math": ["17", "9"]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows that are strings are written verbatim, so tests can plant malformed lines."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_hf(path: Path, rows: list[dict[str, Any]]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": pytest.param(("data.jsonl", write_jsonl), id="jsonl"),
    "parquet": pytest.param(("data.parquet", write_parquet), id="parquet", marks=needs_pyarrow),
    "hf": pytest.param(("hf_folder", write_hf), id="hf-save_to_disk", marks=needs_datasets),
}


def load(path: Path, **kwargs: Any) -> LoadResult:
    return load_examples(DatasetSpec(path=str(path), **kwargs))


def reasons(result: LoadResult) -> dict[int, str]:
    return {p.row: p.reason for p in result.skipped}


# --------------------------------------------------------------------------------------------
# Presets across formats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", list(WRITERS.values()))
@pytest.mark.parametrize("preset", ["plain", "gsm8k", "dapo-math"])
def test_each_preset_loads_from_each_format(tmp_path: Path, writer: tuple[str, Any], preset: str) -> None:
    name, write = writer
    path = write(tmp_path / name, ROWS_BY_PRESET[preset]())
    result = load(path, preset=preset)  # format=auto: by extension, or folder -> hf
    assert [e.answer for e in result.examples] == EXPECTED_ANSWERS[preset]
    assert result.skipped == []
    assert [e.metadata["source_row"] for e in result.examples] == ([1, 2] if name.endswith("jsonl") else [0, 1])
    assert all(e.metadata["source_path"] == str(path) for e in result.examples)


def test_plain_preset_keeps_prompt_text_and_extra_fields(tmp_path: Path) -> None:
    result = load(write_jsonl(tmp_path / "d.jsonl", plain_rows()))
    first = result.examples[0]
    assert first.prompt == "What is 1+1?"
    assert first.metadata["difficulty"] == "easy"
    assert "prompt" not in first.metadata and "answer" not in first.metadata


def test_gsm8k_preset_extracts_answer_after_marker_and_keeps_solution(tmp_path: Path) -> None:
    rows = [
        *gsm8k_rows(),
        {"question": "Big?", "answer": "x\n#### 109,200,000 "},
        {"question": "Neg?", "answer": "#### -3"},
    ]
    result = load(write_jsonl(tmp_path / "g.jsonl", rows), preset="gsm8k")
    assert [e.answer for e in result.examples] == ["72", "1080", "109200000", "-3"]
    assert result.examples[0].prompt == rows[0]["question"]
    assert result.examples[0].metadata["solution"] == rows[0]["answer"]


def test_gsm8k_preset_accepts_numeric_answer(tmp_path: Path) -> None:
    # A number is already a final answer; there is no '####' to look for.
    result = load(write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": 42}]), preset="gsm8k")
    assert result.examples[0].answer == "42"


@pytest.mark.parametrize("writer", list(WRITERS.values()))
def test_dapo_math_preset_keeps_messages_and_metadata(tmp_path: Path, writer: tuple[str, Any]) -> None:
    name, write = writer
    result = load(write(tmp_path / name, dapo_rows()), preset="dapo-math")
    first = result.examples[0]
    assert first.prompt == [{"role": "user", "content": dapo_prompt("Find x if 2x = 34.")}]
    assert first.metadata["data_source"] == "math_dapo"
    assert first.metadata["extra_info"] == {"index": "a1b2"}
    assert first.metadata["ability"] == "MATH"
    # The dotted path's parent stays: its 'style' tells which verifier applies.
    assert first.metadata["reward_model"]["style"] == "rule-lighteval/MATH_v2"
    assert "prompt" not in first.metadata


# --------------------------------------------------------------------------------------------
# Field mapping
# --------------------------------------------------------------------------------------------


def test_field_overrides_take_precedence_over_preset(tmp_path: Path) -> None:
    rows = [{"problem": "Compute 5-2.", "solution": {"final": 3}, "prompt": "ignored", "answer": "ignored"}]
    result = load(write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="problem", answer_field="solution.final")
    assert result.examples[0].prompt == "Compute 5-2."
    assert result.examples[0].answer == "3"


def test_dotted_path_indexes_lists_and_exact_dotted_keys_win(tmp_path: Path) -> None:
    rows = [{"msgs": [{"content": "hello?"}], "a.b": "exact", "a": {"b": "nested"}}]
    result = load(
        write_jsonl(tmp_path / "d.jsonl", rows), preset="custom", prompt_field="msgs.0.content", answer_field="a.b"
    )
    assert result.examples[0].prompt == "hello?"
    assert result.examples[0].answer == "exact"


def test_custom_preset_requires_both_fields() -> None:
    with pytest.raises(DatasetError, match=r"data\.preset='custom'.*data\.answer_field"):
        DatasetSpec(path="x.jsonl", preset="custom", prompt_field="q")


def test_messages_prompt_is_accepted_by_plain_preset(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "2+2?"}
    rows = [{"prompt": [{**system, "extra": None}, user], "answer": 4}]
    result = load(write_jsonl(tmp_path / "d.jsonl", rows))
    # Extra keys (Arrow struct unification adds them as nulls) are dropped.
    assert result.examples[0].prompt == [system, user]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7, "7"), (-3, "-3"), (72.0, "72"), (2.5, "2.5"), ("  12 ", "12"), ("\\frac{1}{2}", "\\frac{1}{2}")],
)
def test_answers_are_normalised_to_text(value: Any, expected: str) -> None:
    example = example_from_row({"prompt": "q", "answer": value}, DatasetSpec(path="x.jsonl"))
    assert example.answer == expected


# --------------------------------------------------------------------------------------------
# Bad rows: skipped and reported by position and reason
# --------------------------------------------------------------------------------------------


def test_every_kind_of_bad_jsonl_row_is_reported_with_line_number(tmp_path: Path) -> None:
    lines: list[Any] = [
        {"prompt": "good 1", "answer": "1"},  # line 1
        {"answer": "1"},  # 2: missing prompt
        {"prompt": "q"},  # 3: missing answer
        {"prompt": "q", "answer": {"value": 1}},  # 4: answer is a dict
        {"prompt": "   \n", "answer": "1"},  # 5: whitespace prompt
        {"prompt": "q", "answer": "  "},  # 6: empty answer
        '{"prompt": "q", "answer": ',  # 7: malformed JSON
        "",  # 8: blank line, silently ignored
        '["not", "an", "object"]',  # 9: not an object
        {"prompt": "q", "answer": ["1"]},  # 10: answer is a list
        {"prompt": "q", "answer": True},  # 11: boolean answer
        {"prompt": "q", "answer": None},  # 12: null answer
        {"prompt": 5, "answer": "1"},  # 13: prompt is a number
        {"prompt": [], "answer": "1"},  # 14: empty message list
        {"prompt": [{"role": "system", "content": "only system"}], "answer": "1"},  # 15: no user turn
        {"prompt": [{"role": "user", "content": None}], "answer": "1"},  # 16: content not text
        {"prompt": ["hi"], "answer": "1"},  # 17: message not an object
        '{"prompt": "q", "answer": NaN}',  # 18: NaN answer
        {"prompt": "good 2", "answer": 2},  # 19
    ]
    result = load(write_jsonl(tmp_path / "bad.jsonl", lines))
    assert [e.prompt for e in result.examples] == ["good 1", "good 2"]
    assert [e.metadata["source_row"] for e in result.examples] == [1, 19]
    got = reasons(result)
    assert all(p.unit == "line" for p in result.skipped)
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert got[2] == "missing field 'prompt'"
    assert got[3] == "missing field 'answer'"
    assert "answer field 'answer' is an object (dict)" in got[4]
    assert got[5] == "prompt field 'prompt' is empty"
    assert got[6] == "answer field 'answer' is empty"
    assert got[7].startswith("malformed JSON")
    assert "expected a JSON object" in got[9]
    assert "is a list" in got[10]
    assert "boolean" in got[11]
    assert "is null" in got[12]
    assert "prompt field 'prompt' is a int" in got[13]
    assert "empty list of messages" in got[14]
    assert "no user message" in got[15]
    assert "'content' is null" in got[16]
    assert "message 0 is a str" in got[17]
    assert "finite number" in got[18]
    assert str(result.skipped[0]) == "line 2: missing field 'prompt'"


def test_invalid_utf8_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "\xff\xfe", "answer": "1"}\n')
    result = load(path)
    assert len(result.examples) == 1
    assert result.skipped[0].row == 2 and "UTF-8" in result.skipped[0].reason


def test_utf8_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\r\n{"prompt": "b", "answer": "2"}\r\n')
    assert [e.answer for e in load(path).examples] == ["1", "2"]


def test_gsm8k_answer_without_marker_is_skipped(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "no marker here"}, {"question": "q2", "answer": "x\n####  "}, *gsm8k_rows()]
    result = load(write_jsonl(tmp_path / "g.jsonl", rows), preset="gsm8k")
    assert len(result.examples) == 2
    got = reasons(result)
    assert "no '####'" in got[1]
    assert "empty after '####'" in got[2]


def test_missing_nested_field_names_the_missing_segment(tmp_path: Path) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}},
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": "17"},
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "17"}},
    ]
    result = load(write_jsonl(tmp_path / "d.jsonl", rows), preset="dapo-math")
    got = reasons(result)
    assert got[1] == "missing field 'reward_model.ground_truth' (no 'ground_truth' inside 'reward_model')"
    assert "field 'reward_model' is a str" in got[2]
    assert [e.answer for e in result.examples] == ["17"]


@needs_pyarrow
def test_bad_parquet_rows_are_reported_by_zero_based_index(tmp_path: Path) -> None:
    rows = [
        {"prompt": "good", "answer": "1"},
        {"prompt": None, "answer": "1"},
        {"prompt": "q", "answer": ""},
        {"prompt": "good too", "answer": "2"},
    ]
    result = load(write_parquet(tmp_path / "d.parquet", rows))
    assert [e.metadata["source_row"] for e in result.examples] == [0, 3]
    assert [str(p) for p in result.skipped] == [
        "row 1: prompt field 'prompt' is null, expected text or a list of chat messages",
        "row 2: answer field 'answer' is empty",
    ]


# --------------------------------------------------------------------------------------------
# Whole-dataset errors: one line, naming the file, the problems and the fix
# --------------------------------------------------------------------------------------------


def assert_one_line(message: str) -> None:
    assert "\n" not in message and message.strip() == message


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load(path)
    message = str(info.value)
    assert_one_line(message)
    assert str(path) in message and "no rows" in message and "fix:" in message


def test_all_bad_rows_raise_with_first_problems_and_fix(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(DatasetError) as info:
        load(path)  # preset plain, but the rows are gsm8k-shaped
    message = str(info.value)
    assert_one_line(message)
    assert isinstance(info.value, ValueError)
    assert str(path) in message
    assert "line 1: missing field 'prompt'; line 2: missing field 'prompt'; line 3:" in message
    assert "and 3 more" in message
    assert "['question', 'answer']" in message and "data.preset" in message and "data.prompt_field" in message


def test_all_malformed_json_suggests_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "array.jsonl"
    path.write_text('[{"prompt": "a",\n "answer": "1"}]\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="one JSON object per line") as info:
        load(path)
    assert_one_line(str(info.value))


def test_missing_path_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DatasetError) as info:
        load(missing)
    assert_one_line(str(info.value))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_missing_local_path_with_hf_format_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load(tmp_path / "gone.jsonl", format="hf")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"preset": "alpaca"}, r"data\.preset='alpaca'.*plain, gsm8k, dapo-math, custom"),
        ({"format": "csv"}, r"data\.format='csv'.*auto, jsonl, parquet, hf"),
        ({"max_rows": 0}, r"data\.max_rows=0"),
        ({"prompt_field": " "}, r"data\.prompt_field"),
    ],
)
def test_invalid_settings_name_the_config_key(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(DatasetError, match=pattern):
        DatasetSpec(path="x.jsonl", **kwargs)


def test_settings_are_revalidated_at_load_time(tmp_path: Path) -> None:
    spec = DatasetSpec(path=str(write_jsonl(tmp_path / "d.jsonl", plain_rows())))
    spec.preset = "nonsense"  # mutable dataclass: changed after construction
    with pytest.raises(DatasetError, match=r"data\.preset"):
        load_examples(spec)


def test_unknown_extension_asks_for_format(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"set data\.format"):
        load(path)


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    write_jsonl(path, plain_rows())
    assert len(load(path, format="jsonl")) == 2


def test_folder_with_single_file_format_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is a folder"):
        load(tmp_path, format="jsonl")


def test_gzipped_jsonl_and_json_extension(tmp_path: Path) -> None:
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in plain_rows()))
    assert len(load(gz)) == 2
    assert len(load(write_jsonl(tmp_path / "d.json", plain_rows()))) == 2


def test_truncated_gzip_raises_dataset_error(tmp_path: Path) -> None:
    gz = tmp_path / "d.jsonl.gz"
    data = gzip.compress(("".join(json.dumps(r) + "\n" for r in plain_rows() * 200)).encode())
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot read"):
        load(gz)


@needs_pyarrow
def test_corrupt_parquet_raises_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DatasetError, match="not a readable Parquet file") as info:
        load(path)
    assert_one_line(str(info.value))


def test_missing_pyarrow_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DatasetError, match="pip install pyarrow"):
        load(path)


def test_missing_datasets_library_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match="pip install datasets"):
        load(tmp_path)


# --------------------------------------------------------------------------------------------
# max_rows, Hugging Face specifics, result helpers
# --------------------------------------------------------------------------------------------


def test_max_rows_counts_usable_examples_and_stops_reading(tmp_path: Path) -> None:
    lines: list[Any] = [{"answer": "bad"}] + [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)] + ["{broken"]
    result = load(write_jsonl(tmp_path / "d.jsonl", lines), max_rows=3)
    assert [e.answer for e in result.examples] == ["0", "1", "2"]
    # Reading stopped before the broken last line.
    assert [p.row for p in result.skipped] == [1]


@needs_pyarrow
def test_max_rows_with_parquet(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": i} for i in range(3000)]  # spans several Arrow batches
    result = load(write_parquet(tmp_path / "d.parquet", rows), max_rows=1500)
    assert len(result) == 1500 and result.examples[-1].answer == "1499"


@needs_datasets
def test_hf_dataset_dict_folder_selects_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(plain_rows()), "test": datasets.Dataset.from_list(plain_rows()[:1])}
    ).save_to_disk(str(folder))
    assert len(load(folder, split="test")) == 1
    assert len(load(folder)) == 2
    with pytest.raises(DatasetError, match=r"no split data\.split='validation'; available: (train, test|test, train)$"):
        load(folder, split="validation")


@needs_datasets
def test_hf_format_reads_local_data_file_via_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    # Keep load_dataset's Arrow cache inside the test's folder rather than the user's home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "g.jsonl", gsm8k_rows())
    result = load(path, format="hf", preset="gsm8k")
    assert [e.answer for e in result.examples] == ["72", "1080"]
    assert [e.metadata["source_row"] for e in result.examples] == [0, 1]


def test_example_equality_and_hash_ignore_metadata() -> None:
    a = Example(prompt="q", answer="1", metadata={"source_row": 1})
    b = Example(prompt="q", answer="1", metadata={"source_row": 2})
    assert a == b and hash(a) == hash(b)
    assert Example(prompt="q", answer="1").metadata == {}


def test_example_from_row_raises_row_error() -> None:
    with pytest.raises(RowError, match="missing field 'prompt'"):
        example_from_row({"answer": "1"}, DatasetSpec(path="x.jsonl"))


def test_load_result_summary(tmp_path: Path) -> None:
    result = load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "1"}, {"prompt": "q"}]))
    assert result.summary() == f"{tmp_path / 'd.jsonl'}: 1 examples, 1 rows skipped (line 2: missing field 'answer')"
    assert result.skipped == [RowProblem(row=2, reason="missing field 'answer'", unit="line")]


def test_public_constants() -> None:
    assert PRESETS == ("plain", "gsm8k", "dapo-math", "custom")
    assert FORMATS == ("auto", "jsonl", "parquet", "hf")
    assert TEMPLATES == ("raw", "dapo", "gsm8k", "chat")


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def test_dapo_instruction_is_exact() -> None:
    assert DAPO_INSTRUCTION.format(problem="What is 1+1?") == DAPO_EXPECTED
    assert render_prompt(Example("What is 1+1?", "2"), "dapo") == DAPO_EXPECTED


def test_gsm8k_template_matches_verl_wording() -> None:
    text = render_prompt(Example("What is 1+1?", "2"), "gsm8k")
    assert text == 'What is 1+1? Let\'s think step by step and output the final answer after "####".'
    assert GSM8K_INSTRUCTION.format(problem="What is 1+1?") == text


def test_raw_template_returns_text_and_joins_messages() -> None:
    assert render_prompt(Example("  exactly as is\n", "1"), "raw") == "  exactly as is\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert render_prompt(Example(messages, "4"), "raw") == "Be brief.\n\n2+2?"


def test_instruction_goes_on_last_user_message_without_mutating_example() -> None:
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "Answer: 2"},
        {"role": "user", "content": "What is 1+1?"},
    ]
    example = Example(messages, "2")
    rendered = render_messages(example, "dapo")
    assert rendered[0]["content"] == "1+1?" and rendered[2]["content"] == DAPO_EXPECTED
    assert example.prompt[2]["content"] == "What is 1+1?"


def test_dapo_template_does_not_wrap_dapo_math_prompts_twice(tmp_path: Path) -> None:
    example = load(write_jsonl(tmp_path / "d.jsonl", dapo_rows()), preset="dapo-math").examples[0]
    assert render_prompt(example, "dapo") == dapo_prompt("Find x if 2x = 34.")
    assert render_prompt(example, "raw") == render_prompt(example, "dapo")
    assert apply_instruction(apply_instruction("q", "gsm8k"), "gsm8k") == apply_instruction("q", "gsm8k")


def test_unknown_template_names_valid_values() -> None:
    with pytest.raises(TemplateError, match=r"data\.template='qwen'.*raw, dapo, gsm8k, chat"):
        render_prompt(Example("q", "1"), "qwen")


def test_template_needs_a_user_message() -> None:
    with pytest.raises(TemplateError, match="no user message"):
        render_prompt(Example([{"role": "system", "content": "hi"}], "1"), "dapo")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: str | None) -> Any:
    """A word-level tokenizer built in memory: exercises the real transformers chat-template path."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "what": 1, "is": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_chat_template_renders_messages_with_generation_prompt() -> None:
    tokenizer = tiny_tokenizer(CHAT_TEMPLATE)
    example = Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}], "2")
    assert render_prompt(example, "chat", tokenizer) == (
        "<|system|>Be brief.<|end|>\n<|user|>What is 1+1?<|end|>\n<|assistant|>"
    )
    assert render_prompt(example, "dapo", tokenizer, use_chat_template=True) == (
        f"<|system|>Be brief.<|end|>\n<|user|>{DAPO_EXPECTED}<|end|>\n<|assistant|>"
    )
    # Plain-text prompts become one user turn.
    assert render_prompt(Example("What is 1+1?", "2"), "gsm8k", tokenizer, use_chat_template=True) == (
        '<|user|>What is 1+1? Let\'s think step by step and output the final answer after "####".<|end|>\n<|assistant|>'
    )


def test_chat_template_requested_without_one_is_a_clear_error() -> None:
    with pytest.raises(TemplateError, match=r"has no chat template.*data\.use_chat_template=false"):
        render_prompt(Example("q", "1"), "dapo", tiny_tokenizer(None), use_chat_template=True)
    with pytest.raises(TemplateError, match="no tokenizer"):
        render_prompt(Example("q", "1"), "chat")


def test_tokenizer_is_ignored_unless_chat_template_requested() -> None:
    assert render_prompt(Example("What is 1+1?", "2"), "dapo", tiny_tokenizer(CHAT_TEMPLATE)) == DAPO_EXPECTED
