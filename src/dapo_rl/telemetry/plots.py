"""Figures and a summary table that compare runs from their ``metrics.jsonl`` files.

Every figure overlays all runs (one colour per run, the same colour in every figure) against the
training step, so an ablation reads at a glance: which run learns faster, whose entropy
collapses, whose responses run into the length limit. Matplotlib is driven through its
object-oriented API (``Figure`` + Agg canvas), never pyplot, so plotting needs no display and does
not change the calling process's global backend or figure registry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dapo_rl.telemetry.sinks import METRICS_FILENAME, read_metrics

__all__ = ["FIGURE_NAMES", "load_series", "plot_runs", "summary_table"]

# step-sorted (steps, values) per metric name
Series = dict[str, tuple[np.ndarray, np.ndarray]]

PanelStyle = Literal["line", "markers", "cumulative", "band"]
# How the y range is chosen: "free" autoscales; "nonneg" pins the bottom at 0 so that a decay
# towards zero (entropy collapse) reads as such; "fraction" also caps the top at 1 but otherwise
# zooms in, because clip and truncation fractions live near 0; "unit" is always [0, 1], so
# accuracies of different figures compare by eye.
YRange = Literal["free", "nonneg", "fraction", "unit"]


@dataclass(frozen=True)
class _Panel:
    key: str  # metric name; for "band" panels, the prefix of the _p10/_p50/_p90/_mean family
    title: str
    ylabel: str
    style: PanelStyle = "line"
    yrange: YRange = "free"


@dataclass(frozen=True)
class _FigureSpec:
    filename: str
    title: str
    panels: tuple[_Panel, ...]


_FIGURES: Final[tuple[_FigureSpec, ...]] = (
    _FigureSpec(
        "accuracy.png",
        "Accuracy and reward",
        (
            # Evaluated only every few steps: markers make the sparse points visible and keep
            # them from being mistaken for a dense curve. Not smoothed, for the same reason.
            _Panel("eval/accuracy", "Held-out accuracy", "accuracy", "markers", "unit"),
            _Panel(
                "train/accuracy", "Training accuracy (sampled responses)", "accuracy", yrange="unit"
            ),
            _Panel("train/reward_mean", "Training reward (mean)", "reward"),
        ),
    ),
    _FigureSpec(
        "entropy.png",
        "Policy entropy",
        (
            _Panel(
                "train/entropy",
                "Entropy of the policy on its responses",
                "entropy (nats / token)",
                yrange="nonneg",
            ),
        ),
    ),
    _FigureSpec(
        "response_length.png",
        "Response length",
        (
            _Panel("train/response_length_mean", "Mean response length", "tokens"),
            _Panel("train/response_length_max", "Max response length", "tokens"),
            _Panel(
                "train/truncated_frac",
                "Truncated responses (hit the length limit)",
                "fraction of responses",
                yrange="fraction",
            ),
        ),
    ),
    _FigureSpec(
        "clipping.png",
        "Fraction of tokens clipped",
        (
            _Panel(
                "train/clip_frac_low",
                "Clipped at the low side (ratio < 1 - eps_low)",
                "fraction of tokens",
                yrange="fraction",
            ),
            _Panel(
                "train/clip_frac_high",
                "Clipped at the high side (ratio > 1 + eps_high)",
                "fraction of tokens",
                yrange="fraction",
            ),
        ),
    ),
    _FigureSpec(
        "sampling.png",
        "Dynamic sampling",
        (
            _Panel(
                "train/informative_group_frac",
                "Informative groups (0 < accuracy < 1)",
                "fraction of groups",
                yrange="fraction",
            ),
            # From 0: a constant 1 (dynamic sampling off) would otherwise autoscale to 0.96-1.04.
            _Panel("train/generation_rounds", "Generation rounds per step", "rounds", yrange="nonneg"),
            # Logged per step; the running total is what compares the sampling cost of runs.
            _Panel(
                "train/samples_generated",
                "Samples generated (cumulative)",
                "samples",
                "cumulative",
                "nonneg",
            ),
        ),
    ),
    _FigureSpec(
        "sampling_rate.png",
        "Dynamic sampling: round sizing and rejections",
        (
            # p̂ sized the step's first round; the factor is prompts generated per missing group.
            _Panel("sampling/rate_estimate", "Estimated accepted-group rate p̂", "fraction of groups", yrange="unit"),
            _Panel("sampling/oversample_factor", "Prompts generated per missing group", "prompts / group", yrange="nonneg"),
            _Panel("sampling/rejected_too_hard", "Rejected: accuracy <= lo (too hard)", "groups", yrange="nonneg"),
            _Panel("sampling/rejected_too_easy", "Rejected: accuracy >= hi (too easy)", "groups", yrange="nonneg"),
            _Panel("sampling/rejected_low_reward_std", "Rejected: reward std <= min_reward_std", "groups", yrange="nonneg"),
        ),
    ),
    _FigureSpec(
        "sampling_surplus.png",
        "Dynamic sampling: surplus groups and retired prompts",
        (
            _Panel("sampling/surplus_carried", "Surplus carried into the step", "groups", yrange="nonneg"),
            _Panel("sampling/surplus_age_mean", "Age of the surplus trained", "optimiser updates", yrange="nonneg"),
            # Cumulative: any drop at all is the thing to see.
            _Panel("sampling/surplus_dropped_age", "Surplus dropped by the age bound (cumulative)", "groups", "cumulative", "nonneg"),
            _Panel("train/sampling_exhausted", "Steps short of B at the round limit (cumulative)", "steps", "cumulative", "nonneg"),
            _Panel("sampling/prompts_retired", "Prompts retired (solved k visits in a row)", "prompts", yrange="nonneg"),
        ),
    ),
    _FigureSpec(
        "clipped_token_probs.png",
        "Old-policy probability of clipped tokens (median, shaded p10-p90)",
        (
            _Panel(
                "diag/clip_high_old_prob",
                "Clipped at the high side",
                "old-policy probability",
                "band",
                "fraction",
            ),
            _Panel(
                "diag/clip_low_old_prob",
                "Clipped at the low side",
                "old-policy probability",
                "band",
                "fraction",
            ),
        ),
    ),
    _FigureSpec(
        "rollout_mismatch.png",
        "Sampler against trainer: π_rollout vs π_old, and the weight-sync probe",
        (
            _Panel("rollout/logp_abs_diff", "Mean |log π_old − log π_rollout|", "nats", yrange="nonneg"),
            _Panel("rollout/kl", "KL(π_rollout ‖ π_old), k3 per token", "nats", yrange="nonneg"),
            _Panel("rollout/is_weight_max", "Largest importance weight π_old/π_rollout", "weight", yrange="nonneg"),
            _Panel("rollout/ess_frac", "Effective sample size of the weights", "fraction of n", yrange="unit"),
            _Panel("rollout/masked_frac", "Tokens rejected by the correction", "fraction", yrange="fraction"),
            # Should sit at float rounding (fp32) or bf16 noise; a jump means the engine left the trainer.
            _Panel("rollout/sync_logp_abs_diff", "Weight-sync probe: engine vs trainer after each push", "nats", yrange="nonneg"),
        ),
    ),
    _FigureSpec(
        "multi_turn.png",
        "Multi-turn rollouts: turns, tool calls and their errors, the environment's share",
        (
            _Panel("rollout/turns_mean", "Model turns per trajectory (mean)", "turns", yrange="nonneg"),
            _Panel("rollout/tool_calls_mean", "Tool calls per trajectory (mean)", "calls", yrange="nonneg"),
            *(_Panel(f"rollout/tool_errors/{kind}", f"Tool errors: {kind.replace('_', ' ')}", "per step", yrange="nonneg")
              for kind in ("parse_error", "unknown_tool", "bad_arguments", "exception", "timeout")),
            _Panel("rollout/environment_token_frac", "Environment tokens (context, not trained)", "fraction", yrange="fraction"),
            _Panel("rollout/model_tokens_per_turn", "Model tokens per turn", "tokens", yrange="nonneg"),
            _Panel("eval/turns_mean", "Held-out: model turns per trajectory", "turns", "markers", "nonneg"),
        ),
    ),
)

FIGURE_NAMES: Final = tuple(spec.filename for spec in _FIGURES)


def _metrics_file(path: Path) -> Path:
    file = path / METRICS_FILENAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"telemetry.plots: no {METRICS_FILENAME} at {path}")
    return file


def load_series(run: str | os.PathLike[str]) -> Series:
    """Per-metric ``(steps, values)`` arrays from a run directory (or its metrics file).

    Nulls are dropped. When a step appears twice (a run resumed from a checkpoint re-logs the
    steps after it), the later value wins: it belongs to the history that actually continued.
    """
    by_key: dict[str, dict[int, float]] = {}
    for record in read_metrics(_metrics_file(Path(run))):
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or value is None or not isinstance(value, (int, float)):
                continue
            by_key.setdefault(key, {})[step] = float(value)
    series: Series = {}
    for key, points in by_key.items():
        steps = np.array(sorted(points), dtype=np.int64)
        series[key] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return series


def _run_names(paths: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise ValueError(f"telemetry.plots: got {len(names)} names for {len(paths)} runs")
        return [str(n) for n in names]
    # The folder that holds metrics.jsonl; grow the name leftwards until runs are told apart
    # (e.g. "ablation_a/seed0" vs "ablation_b/seed0").
    dirs = [p if p.is_dir() else p.parent for p in paths]
    parts = [d.resolve().parts for d in dirs]
    depth = 1
    while True:
        labels = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(pp) for pp in parts):
            return labels
        depth += 1


def _ema(values: np.ndarray, smooth: float) -> np.ndarray:
    # Debiased like TensorBoard's slider, so the first points are not dragged towards zero.
    out = np.empty_like(values)
    acc = 0.0
    for i, v in enumerate(values):
        acc = smooth * acc + (1.0 - smooth) * v
        out[i] = acc / (1.0 - smooth ** (i + 1))
    return out


def _has_data(series: Series, panel: _Panel) -> bool:
    if panel.style == "band":
        return f"{panel.key}_p50" in series or f"{panel.key}_mean" in series
    return panel.key in series


def _draw_panel(ax: Axes, panel: _Panel, runs: list[tuple[str, Series]], smooth: float) -> None:
    for i, (name, series) in enumerate(runs):
        color = f"C{i % 10}"
        if panel.style == "band":
            _draw_band(ax, panel.key, name, series, color)
            continue
        if panel.key not in series:
            continue
        steps, values = series[panel.key]
        if panel.style == "markers":
            ax.plot(steps, values, marker="o", markersize=5, linewidth=1.2, color=color, label=name)
        elif panel.style == "cumulative":
            ax.plot(steps, np.cumsum(values), linewidth=1.6, color=color, label=name)
        elif smooth > 0.0 and len(values) > 1:
            ax.scatter(steps, values, s=6, color=color, alpha=0.25, linewidths=0)
            ax.plot(steps, _ema(values, smooth), linewidth=1.8, color=color, label=name)
        else:
            # Short runs get markers so that a handful of points (or a single one) is visible.
            marker = "." if len(values) <= 50 else None
            ax.plot(steps, values, marker=marker, linewidth=1.6, color=color, label=name)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(panel.ylabel)
    _set_yrange(ax, panel.yrange)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _set_yrange(ax: Axes, yrange: YRange) -> None:
    if yrange == "free":
        return
    if yrange == "unit":
        ax.set_ylim(-0.02, 1.02)
        return
    top = ax.get_ylim()[1]
    if yrange == "fraction":
        top = min(top, 1.02)
    top = max(top, 1e-6)  # an all-zero series still needs a non-empty range
    ax.set_ylim(-0.02 * top, top)


def _break_gaps(steps: np.ndarray, values: np.ndarray, logged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert a NaN wherever the run logged a step between two points of this metric.

    Clip diagnostics exist only on steps where some token was clipped; a line drawn straight
    across the steps without any would invent values there. Matplotlib breaks lines (and
    ``fill_between``) at NaN.
    """
    if len(steps) < 2:
        return steps.astype(np.float64), values
    out_steps: list[float] = [float(steps[0])]
    out_values: list[float] = [float(values[0])]
    for prev, step, value in zip(steps[:-1], steps[1:], values[1:]):
        if np.any((logged > prev) & (logged < step)):
            out_steps.append((prev + step) / 2)
            out_values.append(np.nan)
        out_steps.append(float(step))
        out_values.append(float(value))
    return np.array(out_steps), np.array(out_values)


def _draw_band(ax: Axes, prefix: str, name: str, series: Series, color: str) -> None:
    centre_key = f"{prefix}_p50" if f"{prefix}_p50" in series else f"{prefix}_mean"
    if centre_key not in series:
        return
    logged = np.unique(np.concatenate([s for s, _ in series.values()]))
    steps, centre = _break_gaps(*series[centre_key], logged)
    label = name if centre_key.endswith("_p50") else f"{name} (mean)"
    ax.plot(
        steps,
        centre,
        linewidth=1.6,
        color=color,
        label=label,
        # Always marked: after a gap a point can stand alone, and a lone point has no line.
        marker="." if len(steps) <= 50 else ",",
    )
    lo, hi = series.get(f"{prefix}_p10"), series.get(f"{prefix}_p90")
    if lo is None or hi is None:
        return
    # Steps with no clipped token on that side have null quantiles; shade only where both
    # ends of the band exist.
    common, i_lo, i_hi = np.intersect1d(lo[0], hi[0], return_indices=True)
    if len(common):
        band_steps, low = _break_gaps(common, lo[1][i_lo], logged)
        _, high = _break_gaps(common, hi[1][i_hi], logged)
        ax.fill_between(band_steps, low, high, color=color, alpha=0.2, linewidth=0)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    smooth: float = 0.0,
    dpi: int = 120,
) -> list[Path]:
    """Write comparison figures for ``run_dirs`` into ``out_dir`` and return their paths.

    Each run directory must hold a ``metrics.jsonl``; ``names`` label the runs in legends
    (default: the run folder's name). ``smooth`` in [0, 1) is an exponential-moving-average
    weight per logged point: 0 draws the raw curve, larger values draw the smoothed curve over
    faint raw points. A panel whose metric no run has is left out, and a figure with no panels
    is not written, so the returned list says what was drawn.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"telemetry.plots: smooth must be in [0, 1), got {smooth}")
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("telemetry.plots: no runs given")
    labels = _run_names(paths, names)
    runs = [(label, load_series(p)) for label, p in zip(labels, paths, strict=True)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for spec in _FIGURES:
        panels = [p for p in spec.panels if any(_has_data(s, p) for _, s in runs)]
        if not panels:
            continue
        fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            _draw_panel(ax, panel, runs, smooth)
        fig.suptitle(spec.title, fontsize=12)
        path = out / spec.filename
        fig.savefig(path, dpi=dpi)
        written.append(path)
    return written


# (row label, metric, reduction): "last" is the final logged value, the natural "where did the
# run end up"; best eval accuracy and total samples answer the two other questions people ask.
_SUMMARY_ROWS: Final[tuple[tuple[str, str, Literal["last", "max", "sum"]], ...]] = (
    ("eval/accuracy", "eval/accuracy", "last"),
    ("eval/accuracy (best)", "eval/accuracy", "max"),
    ("train/accuracy", "train/accuracy", "last"),
    ("train/reward_mean", "train/reward_mean", "last"),
    ("train/entropy", "train/entropy", "last"),
    ("train/response_length_mean", "train/response_length_mean", "last"),
    ("train/truncated_frac", "train/truncated_frac", "last"),
    ("train/clip_frac_low", "train/clip_frac_low", "last"),
    ("train/clip_frac_high", "train/clip_frac_high", "last"),
    ("train/informative_group_frac", "train/informative_group_frac", "last"),
    ("train/samples_generated (total)", "train/samples_generated", "sum"),
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.4g}"


def summary_table(
    run_dirs: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None
) -> str:
    """A plain-text table of each run's final key metrics: one row per metric, one column per run.

    Metrics as rows keeps the table narrow for the usual handful of runs however many metrics
    there are. A metric a run never logged shows as ``-``.
    """
    paths = [Path(p) for p in run_dirs]
    labels = _run_names(paths, names)
    runs = [load_series(p) for p in paths]

    rows: list[list[str]] = [["metric", *labels]]
    last_steps = [max((int(s[0][-1]) for s in series.values()), default=None) for series in runs]
    rows.append(["last step", *(_fmt(s) for s in last_steps)])
    for label, key, how in _SUMMARY_ROWS:
        cells = []
        for series in runs:
            if key not in series:
                cells.append("-")
                continue
            values = series[key][1]
            reduced = {"last": values[-1], "max": values.max(), "sum": values.sum()}[how]
            cells.append(_fmt(float(reduced)))
        rows.append([label, *cells])

    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for r, row in enumerate(rows):
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
