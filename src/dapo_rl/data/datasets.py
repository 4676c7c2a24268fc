"""Loading prompt/answer datasets from JSONL, Parquet and Hugging Face ``datasets``.

Real datasets are messy: a missing field, a dict where a string was expected or one broken line
should cost one row, not the training run. So every row is validated on its own; unusable rows are
skipped and reported with their position and reason (``LoadResult.skipped``), and only a dataset
with *no* usable rows is an error. Errors are :class:`DatasetError` (a ``ValueError``) with a
one-line message that names the file, what went wrong and the configuration key that fixes it.

Row positions are reported the way the user would look the row up: JSON Lines by 1-based *line*
number (what an editor shows), Parquet and Hugging Face datasets by 0-based *row* index (what
``df.iloc[i]`` / ``ds[i]`` take).

Optional dependencies (``pyarrow`` for Parquet, ``datasets`` for Hugging Face) are imported only
when such a file is read, so plain JSONL needs neither.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from dapo_rl.errors import one_line

__all__ = [
    "FORMATS",
    "PRESETS",
    "DatasetError",
    "DatasetSpec",
    "Example",
    "LoadResult",
    "RowError",
    "RowProblem",
    "example_from_row",
    "load_examples",
]

#: Valid values of ``DatasetSpec.format`` (config key ``data.format``).
FORMATS: tuple[str, ...] = ("auto", "jsonl", "parquet", "hf")

#: Default (prompt field, answer field) per preset; ``custom`` has none, so both must be given.
_PRESET_FIELDS: dict[str, tuple[str | None, str | None]] = {
    "plain": ("prompt", "answer"),
    "gsm8k": ("question", "answer"),
    "dapo-math": ("prompt", "reward_model.ground_truth"),
    "custom": (None, None),
}

#: Valid values of ``DatasetSpec.preset`` (config key ``data.preset``).
PRESETS: tuple[str, ...] = tuple(_PRESET_FIELDS)

# Keys the loader adds to every example's metadata. Prefixed so they rarely collide with a
# dataset's own columns; where they do, the loader's value wins (it is the one the user needs
# to find the row again).
_META_SOURCE = "source_path"
_META_ROW = "source_row"

# How many row problems a "no usable rows" message quotes before summarising the rest: enough to
# see a pattern, short enough to stay one readable line.
_PROBLEMS_IN_MESSAGE = 3

# Rows per Arrow batch when iterating Parquet / HF data: bounds memory for big files while keeping
# the per-batch overhead negligible.
_ARROW_BATCH_ROWS = 1024

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
# Marker files that tell a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder apart
# from a folder of raw data files (which ``datasets.load_dataset`` reads instead).
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
# ``datasets.load_dataset`` builder for a single local data file, by extension.
_HF_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class DatasetError(ValueError):
    """The dataset as configured cannot be used; the message says why and how to fix it."""


class RowError(ValueError):
    """One row cannot be turned into an :class:`Example`; the message is the reason."""


@dataclass(frozen=True)
class Example:
    """One training/evaluation item: what the model is asked and the verifiable ground truth.

    ``prompt`` is either plain text or chat messages (``[{"role": ..., "content": ...}]``); the
    prompt templates (``dapo_rl.data.templates``) turn either into model input. ``metadata`` holds
    the rest of the source row plus where it came from; it is left out of hashing and equality
    because dicts are unhashable and two items with the same prompt and answer are the same task.
    """

    prompt: str | list[dict[str, str]]
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class DatasetSpec:
    """Where a dataset lives and how its rows map onto :class:`Example` (config section ``data``).

    ``prompt_field`` / ``answer_field`` override the preset's fields and may be dotted paths into
    nested objects (``reward_model.ground_truth``); a numeric segment indexes a list
    (``prompt.0.content``). ``max_rows`` caps the number of *usable examples* returned, and reading
    stops once it is reached. ``subset`` is the Hugging Face config name (e.g. ``main`` for
    ``openai/gsm8k``) and is used only with the ``hf`` format.
    """

    path: str
    format: str = "auto"
    preset: str = "plain"
    split: str = "train"
    prompt_field: str | None = None
    answer_field: str | None = None
    max_rows: int | None = None
    subset: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the settings that do not need the file, so typos fail before any I/O.

        Also called by :func:`load_examples`, because the dataclass is mutable and fields may have
        changed since construction.
        """
        if self.format not in FORMATS:
            raise DatasetError(f"data.format={self.format!r} is not a known format; valid values: {', '.join(FORMATS)}")
        if self.preset not in PRESETS:
            raise DatasetError(f"data.preset={self.preset!r} is not a known preset; valid values: {', '.join(PRESETS)}")
        if self.preset == "custom":
            missing = [k for k in ("prompt_field", "answer_field") if not getattr(self, k)]
            if missing:
                raise DatasetError(
                    "data.preset='custom' needs both data.prompt_field and data.answer_field; "
                    f"missing: {', '.join('data.' + k for k in missing)}"
                )
        for key in ("prompt_field", "answer_field"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DatasetError(f"data.{key}={value!r} must be a non-empty field name or dotted path")
        if self.max_rows is not None and (
            isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1
        ):
            raise DatasetError(f"data.max_rows={self.max_rows!r} must be a positive integer or null (no limit)")
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            raise DatasetError(f"data.path={self.path!r} must name a file, a folder or a Hugging Face dataset")

    @property
    def fields(self) -> tuple[str, str]:
        """The (prompt, answer) field paths in effect: overrides first, then the preset's."""
        default_prompt, default_answer = _PRESET_FIELDS[self.preset]
        prompt = self.prompt_field or default_prompt
        answer = self.answer_field or default_answer
        # Only "custom" lacks defaults; validate() normally catches this, but the spec is mutable.
        if prompt is None or answer is None:
            raise DatasetError("data.preset='custom' needs both data.prompt_field and data.answer_field")
        return prompt, answer


@dataclass(frozen=True)
class RowProblem:
    """Why one row was skipped. ``unit`` says how ``row`` counts: ``line`` (1-based, JSON Lines)
    or ``row`` (0-based index, Parquet / Hugging Face)."""

    row: int
    reason: str
    unit: str = "row"

    def __str__(self) -> str:
        return f"{self.unit} {self.row}: {self.reason}"


@dataclass
class LoadResult:
    """The usable examples, and every row that was skipped with its reason."""

    examples: list[Example]
    skipped: list[RowProblem]
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        """One line for logs: how many examples were loaded and, if any, why rows were skipped."""
        text = f"{self.source}: {len(self.examples)} examples"
        if self.skipped:
            text += f", {len(self.skipped)} rows skipped ({_quote_problems(self.skipped)})"
        return text


# --------------------------------------------------------------------------------------------
# Row -> Example
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _get_path(row: dict[str, Any], path: str) -> Any:
    """Follow a dotted path through nested dicts (and lists, by numeric segment).

    An exact top-level key wins over a dotted interpretation, so a column literally named
    ``"a.b"`` stays reachable. Raises :class:`RowError` naming the first segment that fails.
    """
    if path in row:
        return row[path]
    current: Any = row
    walked: list[str] = []
    for segment in path.split("."):
        if isinstance(current, dict):
            value = current.get(segment, _MISSING)
        elif isinstance(current, (list, tuple)) and segment.lstrip("-").isdigit():
            index = int(segment)
            value = current[index] if -len(current) <= index < len(current) else _MISSING
        else:
            raise RowError(
                f"field {'.'.join(walked)!r} is {_type_name(current)}, so {path!r} cannot be looked up in it"
            )
        if value is _MISSING:
            if not walked:
                return _MISSING
            raise RowError(f"missing field {path!r} (no {segment!r} inside {'.'.join(walked)!r})")
        walked.append(segment)
        current = value
    return current


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object (dict)"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _require(row: dict[str, Any], path: str) -> Any:
    value = _get_path(row, path)
    if value is _MISSING:
        raise RowError(f"missing field {path!r}")
    return value


def _prompt_from_value(value: Any, path: str) -> str | list[dict[str, str]]:
    """Accept text or chat messages; anything else (or nothing to ask) is a row error."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"prompt field {path!r} is empty")
        return value
    if isinstance(value, (list, tuple)):
        return _messages_from_value(value, path)
    raise RowError(f"prompt field {path!r} is {_type_name(value)}, expected text or a list of chat messages")


def _messages_from_value(value: list[Any] | tuple[Any, ...], path: str) -> list[dict[str, str]]:
    if not value:
        raise RowError(f"prompt field {path!r} is an empty list of messages")
    messages: list[dict[str, str]] = []
    has_question = False
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"prompt field {path!r} message {i} is {_type_name(message)}, expected {{role, content}}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RowError(f"prompt field {path!r} message {i} has no string 'role'")
        if not isinstance(content, str):
            raise RowError(f"prompt field {path!r} message {i} 'content' is {_type_name(content)}, expected text")
        # Only role/content are kept: Arrow struct columns add null keys for fields other rows
        # have, and chat templates choke on None values.
        messages.append({"role": role, "content": content})
        has_question = has_question or (role == "user" and bool(content.strip()))
    if not has_question:
        raise RowError(f"prompt field {path!r} has no user message with content")
    return messages


def _answer_from_value(value: Any, path: str) -> str:
    """Ground truth as text; numbers are welcome (datasets often store them as such)."""
    if isinstance(value, bool):
        # bool is an int subclass; a True/False ground truth is almost always a wrong column.
        raise RowError(f"answer field {path!r} is a boolean, expected text or a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(f"answer field {path!r} is {value}, expected a finite number")
        # 72.0 -> "72": float columns often hold integer answers, and "72.0" would not match a
        # model that writes 72 under a string comparison.
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise RowError(f"answer field {path!r} is empty")
        return text
    raise RowError(f"answer field {path!r} is {_type_name(value)}, expected text or a number")


def _gsm8k_final_answer(text: str, path: str) -> str:
    """GSM8K solutions end in ``#### <answer>``; the ground truth is that answer, commas removed."""
    if "####" not in text:
        raise RowError(f"answer field {path!r} has no '####' final-answer marker (gsm8k preset)")
    final = text.rsplit("####", 1)[1].strip()
    final = _THOUSANDS_COMMA.sub("", final)
    if not final:
        raise RowError(f"answer field {path!r} is empty after '####' (gsm8k preset)")
    return final


def example_from_row(row: dict[str, Any], spec: DatasetSpec, *, position: int = 0, source: str = "") -> Example:
    """Turn one raw row into an :class:`Example` under ``spec``'s preset and field mapping.

    Raises :class:`RowError` with a human-readable reason when the row is unusable. Fields other
    than the prompt and answer columns are kept in ``metadata`` (for ``dapo-math`` that includes
    ``data_source``, ``ability`` and ``extra_info``), together with ``source_path``/``source_row``.
    """
    if not isinstance(row, dict):
        raise RowError(f"row is {_type_name(row)}, expected an object with named fields")
    prompt_path, answer_path = spec.fields
    prompt = _prompt_from_value(_require(row, prompt_path), prompt_path)
    raw_answer = _require(row, answer_path)
    answer = _answer_from_value(raw_answer, answer_path)
    metadata: dict[str, Any] = {}
    if spec.preset == "gsm8k" and isinstance(raw_answer, str):
        answer = _gsm8k_final_answer(answer, answer_path)
        # The worked solution is worth keeping (SFT warm-up, debugging rewards) once the answer
        # column no longer holds it.
        metadata["solution"] = raw_answer
    # A field consumed whole is dropped from metadata; a dotted path's parent is kept because it
    # usually carries siblings that matter (reward_model.style tells which verifier to use).
    consumed = {prompt_path, answer_path}
    metadata.update({k: v for k, v in row.items() if k not in consumed})
    if source:
        metadata[_META_SOURCE] = source
    metadata[_META_ROW] = position
    return Example(prompt=prompt, answer=answer, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Readers: each yields (position, row-or-RowError) so a broken row is reported, not fatal.
# --------------------------------------------------------------------------------------------

RowStream = Iterator[tuple[int, Any]]


def _open_binary(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _iter_jsonl(path: str) -> RowStream:
    """Parse line by line so one malformed line costs that line only, reported by its number."""
    try:
        handle = _open_binary(path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    lineno = 0
    with handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError) as exc:  # a truncated/corrupt .gz surfaces mid-read
                raise DatasetError(f"{path}: cannot read past line {lineno} ({one_line(exc, 300)})") from exc
            lineno += 1
            try:
                # utf-8-sig drops a BOM that some editors put at the start of the file.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, RowError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue  # blank lines (a trailing newline, spacing) carry no row
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, RowError(f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(value, dict):
                yield lineno, RowError(f"line holds {_type_name(value)}, expected a JSON object")
                continue
            yield lineno, value


def _iter_arrow_batches(batches: Iterable[Any]) -> RowStream:
    position = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield position, row
            position += 1


def _import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError(
            "reading Parquet files needs pyarrow, which is not installed; fix: pip install pyarrow"
        ) from exc
    return pq


def _iter_parquet(path: str) -> RowStream:
    pq = _import_pyarrow_parquet()
    import pyarrow as pa

    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({one_line(exc, 300)})") from exc
    # Batches keep memory bounded and let max_rows stop early on a large file.
    yield from _iter_arrow_batches(parquet_file.iter_batches(batch_size=_ARROW_BATCH_ROWS))


def _import_hf_datasets() -> Any:
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise DatasetError(
            "reading Hugging Face datasets needs the 'datasets' package, which is not installed; "
            "fix: pip install datasets"
        ) from exc
    return hf_datasets


def _load_hf(spec: DatasetSpec, path: str) -> Any:
    """Resolve ``path`` to one ``datasets.Dataset``: a save_to_disk folder, local data files, or
    (only when nothing exists at ``path``) a Hub name."""
    hf = _import_hf_datasets()
    try:
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _SAVE_TO_DISK_MARKERS):
            loaded = hf.load_from_disk(path)
            if isinstance(loaded, hf.DatasetDict):
                if spec.split not in loaded:
                    raise DatasetError(f"{path}: no split data.split={spec.split!r}; available: {', '.join(loaded)}")
                return loaded[spec.split]
            return loaded
        if os.path.isfile(path):
            builder = _HF_FILE_BUILDERS.get(_extension(path))
            if builder is None:
                raise DatasetError(
                    f"{path}: the 'datasets' library has no reader for this file type; "
                    f"use one of {', '.join(sorted(_HF_FILE_BUILDERS))}"
                )
            # A single data file is its own (train) split; data.split does not apply to it.
            return hf.load_dataset(builder, data_files=path, split="train")
        # A folder of data files, or a Hub dataset name.
        return hf.load_dataset(path, name=spec.subset, split=spec.split)
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one message
        where = "local folder" if os.path.isdir(path) else "Hugging Face dataset"
        raise DatasetError(
            f"{path}: could not load as a {where} with split {spec.split!r} ({one_line(exc, 300)}); "
            "check data.path, data.split and data.subset, and that the Hub is reachable for a Hub name"
        ) from exc


def _iter_hf(spec: DatasetSpec, path: str) -> RowStream:
    dataset = _load_hf(spec, path)
    # Arrow batches go through the same row conversion as Parquet and honour any index mapping
    # (select/shuffle) the dataset carries.
    yield from _iter_arrow_batches(dataset.with_format("arrow").iter(batch_size=_ARROW_BATCH_ROWS))


# --------------------------------------------------------------------------------------------
# Format resolution and the public entry point
# --------------------------------------------------------------------------------------------


def _extension(path: str) -> str:
    lower = path.lower()
    for compound in (".jsonl.gz", ".json.gz"):
        if lower.endswith(compound):
            return compound
    return os.path.splitext(lower)[1]


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_hub_name(path: str) -> bool:
    """``name`` or ``owner/name``, and not a data-file name like ``train.jsonl``."""
    data_suffixes = {*_HF_FILE_BUILDERS, *_JSONL_SUFFIXES, *_PARQUET_SUFFIXES}
    return bool(_HUB_NAME.fullmatch(path)) and _extension(path) not in data_suffixes


def _resolve_format(spec: DatasetSpec, path: str) -> str:
    if spec.format == "hf":
        # A Hub name legitimately does not exist on disk, but something shaped like a local path
        # that is missing should say so rather than surface as a Hub lookup failure.
        if not os.path.exists(path) and not _looks_like_hub_name(path):
            raise DatasetError(f"data.path={path!r} does not exist (and is not a Hugging Face Hub name)")
        return "hf"
    if not os.path.exists(path):
        hint = " (for a Hugging Face Hub dataset, set data.format=hf)" if spec.format == "auto" else ""
        raise DatasetError(f"data.path={path!r} does not exist{hint}")
    if spec.format != "auto":
        if os.path.isdir(path):
            raise DatasetError(
                f"data.path={path!r} is a folder but data.format={spec.format!r} reads a single file; "
                "point data.path at the file, or set data.format=hf for a datasets folder"
            )
        return spec.format
    if os.path.isdir(path):
        return "hf"
    extension = _extension(path)
    if extension in _JSONL_SUFFIXES:
        return "jsonl"
    if extension in _PARQUET_SUFFIXES:
        return "parquet"
    raise DatasetError(
        f"data.path={path!r}: cannot tell the format from the extension {extension or '(none)'!r}; "
        "set data.format to jsonl, parquet or hf (hf also reads csv/json/arrow through 'datasets')"
    )


def _rows(spec: DatasetSpec, path: str, fmt: str) -> tuple[RowStream, str]:
    if fmt == "jsonl":
        return _iter_jsonl(path), "line"
    if fmt == "parquet":
        return _iter_parquet(path), "row"
    return _iter_hf(spec, path), "row"


def load_examples(spec: DatasetSpec) -> LoadResult:
    """Read ``spec.path`` and return its usable examples and the rows that were skipped (and why).

    Raises :class:`DatasetError` when the path or settings are wrong, a needed optional library is
    missing, or no row at all is usable.
    """
    spec.validate()
    path = os.fspath(spec.path)
    fmt = _resolve_format(spec, path)
    stream, unit = _rows(spec, path, fmt)

    examples: list[Example] = []
    skipped: list[RowProblem] = []
    first_fields: list[str] | None = None
    rows_seen = 0
    for position, row in stream:
        rows_seen += 1
        if isinstance(row, RowError):  # the reader could not even parse this row
            skipped.append(RowProblem(row=position, reason=str(row), unit=unit))
            continue
        if first_fields is None and isinstance(row, dict):
            first_fields = list(row)
        try:
            examples.append(example_from_row(row, spec, position=position, source=path))
        except RowError as exc:
            skipped.append(RowProblem(row=position, reason=str(exc), unit=unit))
            continue
        if spec.max_rows is not None and len(examples) >= spec.max_rows:
            break

    if not examples:
        raise DatasetError(_no_usable_rows_message(spec, path, fmt, rows_seen, skipped, first_fields))
    return LoadResult(examples=examples, skipped=skipped, source=path)


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _quote_problems(problems: list[RowProblem]) -> str:
    quoted = "; ".join(str(p) for p in problems[:_PROBLEMS_IN_MESSAGE])
    if len(problems) > _PROBLEMS_IN_MESSAGE:
        quoted += f"; and {len(problems) - _PROBLEMS_IN_MESSAGE} more"
    return quoted


def _no_usable_rows_message(
    spec: DatasetSpec,
    path: str,
    fmt: str,
    rows_seen: int,
    skipped: list[RowProblem],
    first_fields: list[str] | None,
) -> str:
    if rows_seen == 0:
        return (
            f"{path}: the dataset has no rows (format {fmt}); "
            "fix: point data.path at a non-empty dataset (or check data.split)"
        )
    prompt_path, answer_path = spec.fields
    if all("malformed JSON" in p.reason or "expected a JSON object" in p.reason for p in skipped):
        fix = "the file must be JSON Lines: one JSON object per line"
    elif any("missing field" in p.reason for p in skipped):
        seen = f"rows have fields {first_fields}; " if first_fields is not None else ""
        fix = (
            f"{seen}data.preset={spec.preset!r} reads prompt from {prompt_path!r} and answer from "
            f"{answer_path!r}; pick the matching data.preset ({', '.join(PRESETS)}) "
            "or set data.prompt_field / data.answer_field"
        )
    else:
        fix = "correct the rows, or point data.prompt_field / data.answer_field at usable columns"
    return f"{path}: no usable rows ({len(skipped)} of {rows_seen} skipped: {_quote_problems(skipped)}); fix: {fix}"
