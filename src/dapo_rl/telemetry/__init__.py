"""Telemetry: metric sinks (JSONL always; TensorBoard and W&B optional) and comparison plots.

The plotting names are resolved lazily so that the trainer, which only needs the sinks, does
not pay matplotlib's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dapo_rl.telemetry.sinks import (
    METRICS_FILENAME,
    SINK_NAMES,
    JsonlSink,
    MetricSink,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    build_sinks,
    read_metrics,
)

if TYPE_CHECKING:
    from dapo_rl.telemetry.plots import FIGURE_NAMES, load_series, plot_runs, summary_table

__all__ = [
    "FIGURE_NAMES",
    "METRICS_FILENAME",
    "SINK_NAMES",
    "JsonlSink",
    "MetricSink",
    "MultiSink",
    "TensorBoardSink",
    "WandbSink",
    "build_sinks",
    "load_series",
    "plot_runs",
    "read_metrics",
    "summary_table",
]

_LAZY_PLOTS = frozenset({"FIGURE_NAMES", "load_series", "plot_runs", "summary_table"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_PLOTS:
        from dapo_rl.telemetry import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
