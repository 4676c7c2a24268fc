"""Metric sinks: where the trainer's per-step scalars go.

The trainer calls ``sink.log(metrics, step)`` once or more per step and ``sink.close()`` once at
the end. A run always writes ``RUN_DIR/metrics.jsonl`` (the plots and the summary table read
it, and it needs no extra package); TensorBoard and Weights & Biases are optional extras whose
imports are deferred until a sink of that kind is actually built, so a plain install never pays
for them.
"""

from __future__ import annotations

import json
import math
import operator
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

__all__ = [
    "METRICS_FILENAME",
    "SINK_NAMES",
    "WANDB_MODES",
    "JsonlSink",
    "MetricSink",
    "MultiSink",
    "TensorBoardSink",
    "WandbSink",
    "build_sinks",
    "read_metrics",
]

METRICS_FILENAME: Final = "metrics.jsonl"
SINK_NAMES: Final = ("jsonl", "tensorboard", "wandb")
WANDB_MODES: Final = ("offline", "online", "disabled")

_TENSORBOARD_MISSING: Final = (
    "telemetry.sinks: tensorboard is not installed; pip install 'dapo-rl[tensorboard]'"
)
_WANDB_MISSING: Final = "telemetry.sinks: wandb is not installed; pip install 'dapo-rl[wandb]'"

Scalar = int | float | bool


class MetricSink(ABC):
    """Something that receives one flat ``{name: scalar}`` mapping per call, tagged with a step.

    Sinks are context managers so that a crash inside ``with build_sinks(...) as sink:`` still
    flushes and closes every backend.
    """

    @abstractmethod
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record ``metrics`` at training step ``step``."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources; calling it twice must be harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_step(step: int) -> int:
    # A float step (e.g. 3.0 from a division) is a caller bug that would otherwise land silently
    # on the wrong x position in every backend; numpy and torch integer scalars are fine.
    if isinstance(step, bool):
        raise TypeError("telemetry.sinks: step must be an int, got bool")
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(
            f"telemetry.sinks: step must be an int, got {type(step).__name__}"
        ) from None


def _to_scalar(key: str, value: Any) -> Scalar | None:
    """Turn a metric value into a plain Python scalar, or None for a missing/non-finite number.

    Trainers naturally hand over 0-d tensors and numpy scalars; unwrapping them here keeps every
    sink free of torch/numpy special cases. Non-finite floats become None because JSON has no
    NaN/Inf, and a null is an honest "no value at this step".
    """
    if value is None:
        return None
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (int, float)):
        value = item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # float() drops subclasses such as numpy.float64 so every sink sees the same type.
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"telemetry.sinks: metric {key!r} must be a number, got {type(value).__name__}")


def _clean(metrics: Mapping[str, Any]) -> dict[str, Scalar | None]:
    out: dict[str, Scalar | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"telemetry.sinks: metric names must be str, got {key!r}")
        if key == "step":
            raise ValueError("telemetry.sinks: 'step' is reserved; pass it as the step argument")
        out[key] = _to_scalar(key, value)
    return out


class JsonlSink(MetricSink):
    """Appends ``{"step": N, name: value, ...}`` lines to a JSON-lines file.

    ``path`` is the file itself when its name ends in ``.jsonl``, otherwise a run directory
    (created if needed) that gets ``metrics.jsonl`` inside it. The file is opened for appending
    so a resumed run continues the same history; each line is flushed to the OS as soon as it is
    written, so a killed process loses at most the line it was writing (which
    :func:`read_metrics` tolerates).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if p.suffix != ".jsonl":
            # Decided by name, not by what exists on disk, so a fresh run directory and a resumed
            # one resolve to the same file.
            p = p / METRICS_FILENAME
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path: Path = p
        needs_newline = p.exists() and p.stat().st_size > 0 and not _ends_with_newline(p)
        self._file: IO[str] | None = p.open("a", encoding="utf-8")
        if needs_newline:
            # A previous run was killed mid-line; without this, our first record would be glued
            # onto its fragment and both would be unreadable.
            self._file.write("\n")
            self._file.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"telemetry.sinks: JsonlSink({self.path}) is closed")
        record: dict[str, Any] = {"step": _check_step(step)}
        record.update(_clean(metrics))
        # One write per record keeps lines whole in the common case; allow_nan=False guarantees the
        # file stays strict JSON that any reader (jq, pandas, browsers) accepts.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics file written by :class:`JsonlSink` (or a run directory containing one).

    Returns the records in file order, nulls kept as ``None``. A last line that does not parse
    is dropped silently: that is what a run killed mid-write leaves behind. An unparsable line
    elsewhere is skipped with a warning, because it can only come from such a fragment followed
    by a resumed run, or from outside damage, and either way the rest of the history is still
    worth having.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILENAME
    lines = p.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if lineno != len(lines):
                bad.append(lineno)
            continue
        records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warnings.warn(
            f"telemetry.sinks: skipped {len(bad)} unreadable line(s) in {p}: {shown}",
            stacklevel=2,
        )
    return records


class TensorBoardSink(MetricSink):
    """Writes scalars as TensorBoard event files under ``log_dir``.

    Flushes after every ``log`` call: the writer's default is to flush every two minutes, which
    would make a live TensorBoard lag and a killed run lose its last minutes of curves.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            import tensorboard  # noqa: F401  (probe only; torch's error for this is obscure)
        except ImportError:
            raise ImportError(_TENSORBOARD_MISSING) from None
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir: Path = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            raise RuntimeError(f"telemetry.sinks: TensorBoardSink({self.log_dir}) is closed")
        step = _check_step(step)
        for key, value in _clean(metrics).items():
            if value is not None:
                self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.log_dir)!r})"


class WandbSink(MetricSink):
    """Logs to Weights & Biases; ``mode="offline"`` (the default) writes a local run folder under
    ``dir/wandb/`` that ``wandb sync`` can upload later, and touches no network.

    Offline and disabled modes also turn W&B's own error reporting off
    (``WANDB_ERROR_REPORTING=false``, unless the user set that variable): with it on, W&B's
    background service looks up its error-reporting host even in offline mode.
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        config: Mapping[str, Any] | None = None,
        mode: str = "offline",
        dir: str | os.PathLike[str] | None = None,  # wandb.init's own name for it
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(
                f"telemetry.sinks: unknown wandb mode {mode!r}; valid: {', '.join(WANDB_MODES)}"
            )
        try:
            import wandb
        except ImportError:
            raise ImportError(_WANDB_MISSING) from None

        if mode != "online":
            # Read by wandb when it spawns its service process, so it must be set before init.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        self.dir: Path | None = None if dir is None else Path(dir)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self._run: Any = wandb.init(
            project=project,
            name=run_name,
            config=dict(config or {}),
            mode=mode,  # an explicit argument outranks a WANDB_MODE left in the environment
            dir=None if self.dir is None else str(self.dir),
            # The trainer's stdout is a carriage-return progress bar: capturing it into W&B only
            # stores noise, and wrapping sys.stdout fights with pytest's and tqdm's own capture.
            settings=wandb.Settings(console="off"),
        )

    @property
    def run_dir(self) -> Path | None:
        """The local folder of this W&B run (None when mode is "disabled")."""
        if self.mode == "disabled" or self._run is None:
            return None
        # run.dir is the run's "files" folder; its parent is the offline-run-*/run-* folder.
        return Path(self._run.dir).parent

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._run is None:
            raise RuntimeError("telemetry.sinks: WandbSink is closed")
        step = _check_step(step)
        # W&B renders NaN as a gap, which is the same meaning a JSONL null has.
        payload = {k: (math.nan if v is None else v) for k, v in _clean(metrics).items()}
        self._run.log(payload, step=step)

    def close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()

    def __repr__(self) -> str:
        return f"WandbSink(mode={self.mode!r}, dir={str(self.dir)!r})"


class MultiSink(MetricSink):
    """Fans each call out to several sinks, in order."""

    def __init__(self, sinks: Iterable[MetricSink]) -> None:
        self.sinks: tuple[MetricSink, ...] = tuple(sinks)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        # Errors propagate: a metrics backend that silently stops recording mid-run is worse
        # than a visible failure.
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        # Every sink gets closed even if an earlier one fails, so no backend is left unflushed.
        first_error: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # re-raised below, after the rest are closed
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def __repr__(self) -> str:
        return f"MultiSink({list(self.sinks)!r})"


def build_sinks(
    run_dir: str | os.PathLike[str],
    names: Iterable[str],
    run_name: str,
    config: Mapping[str, Any],
    *,
    wandb_project: str = "dapo-rl",
    wandb_mode: str = "offline",
) -> MultiSink:
    """Build the sinks a run asked for, all rooted in ``run_dir``.

    ``names`` is a subset of ``SINK_NAMES`` (case-insensitive); ``"jsonl"`` is always added
    because plotting and the summary table read ``RUN_DIR/metrics.jsonl``. Layout:
    ``RUN_DIR/metrics.jsonl``, ``RUN_DIR/tensorboard/``, ``RUN_DIR/wandb/``.
    """
    if isinstance(names, str):
        # A bare "tensorboard" would otherwise iterate as characters and fail confusingly.
        names = [names]
    wanted: list[str] = ["jsonl"]
    for name in names:
        key = str(name).strip().lower()
        if key not in SINK_NAMES:
            raise ValueError(
                f"telemetry.sinks: unknown sink {name!r}; valid: {', '.join(SINK_NAMES)}"
            )
        if key not in wanted:
            wanted.append(key)
    if "wandb" in wanted and wandb_mode not in WANDB_MODES:
        raise ValueError(
            f"telemetry.sinks: unknown wandb mode {wandb_mode!r}; valid: {', '.join(WANDB_MODES)}"
        )

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    built: list[MetricSink] = []
    try:
        for key in wanted:
            if key == "jsonl":
                built.append(JsonlSink(root / METRICS_FILENAME))
            elif key == "tensorboard":
                built.append(TensorBoardSink(root / "tensorboard"))
            else:
                built.append(WandbSink(wandb_project, run_name, config, mode=wandb_mode, dir=root))
    except BaseException:
        # Don't leak an open file or a live W&B run when a later sink cannot be built.
        MultiSink(built).close()
        raise
    return MultiSink(built)
