"""The ablation ladder's report: per-run summaries, paired effects with confidence intervals, the
table (``ablation.md``), the numbers (``ablation.json``) and the figure (``ablation.png``).

The runs themselves are trained by :mod:`dapo_rl.experiments.ablation`; this module only reads
their folders.

Effects are paired by seed: every rung's run with seed k starts from the same policy and draws
from the same seed, so ``rung − previous rung`` per seed removes the seed-to-seed spread that
both share. The interval is Student's t at 95% over those differences (``scipy.stats.t``), which
with 5 seeds is 2.78 standard errors wide on each side, not 1.96.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from dapo_rl.experiments.ablation import AblationPlan

DEFAULT_TARGET = 0.8
# Final entropy / length / truncation are means over this many last steps: one step's value is
# a single noisy batch.
FINAL_WINDOW = 5
# Each run's final policy's pass@k on the held-out set (a `dapo eval` result), and the start policy's.
PASS_AT_K_FILE = "pass_at_k.json"
BASE_PASS_AT_K_FILE = "start_pass_at_k.json"


def read_pass_at_k(path: Path) -> dict[int, float] | None:
    """``{k: pass@k}`` from a `dapo eval` JSON result, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        return {int(k): float(v) for k, v in json.loads(path.read_text())["pass_at_k"].items()}
    except (json.JSONDecodeError, KeyError, ValueError):
        return None


@dataclass
class RunSummary:
    """The numbers the report needs from one finished run's metrics.jsonl."""

    run_dir: str
    seed: int
    steps: int
    accuracy_start: float | None
    accuracy_final: float | None
    steps_to_target: int | None  # first evaluated step at or above the target; None = not reached
    entropy_final: float | None
    length_final: float | None
    truncated_final: float | None
    informative_frac: float | None  # mean over all steps
    samples_generated: float
    updates: float
    seconds: float | None
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    pass_at_k: dict[int, float] | None = None  # the final policy's, from PASS_AT_K_FILE (None = not evaluated)


_CURVES = ("train/entropy", "train/response_length_mean", "train/truncated_frac", "train/samples_generated_total",
           "train/informative_group_frac")


def summarize_run(run_dir: str | Path, seed: int, target: float = DEFAULT_TARGET, window: int = FINAL_WINDOW) -> RunSummary:
    """Read one run folder's metrics (and its pass@k file, if any) into a :class:`RunSummary`."""
    from dapo_rl.telemetry.plots import load_series

    run_dir = Path(run_dir)
    series = load_series(run_dir)

    def tail_mean(key: str) -> float | None:
        if key not in series:
            return None
        values = series[key][1][-window:]
        return float(values.mean()) if len(values) else None

    def curve(key: str) -> list[tuple[int, float]]:
        if key not in series:
            return []
        steps, values = series[key]
        return [(int(s), float(v)) for s, v in zip(steps, values)]

    evals = curve("eval/accuracy")
    start = next((v for s, v in evals if s == 0), None)
    # Every training step logs some train/ metric (which ones depends on whether it trained at all).
    final_step = max((int(steps[-1]) for key, (steps, _) in series.items() if key.startswith("train/") and len(steps)), default=0)
    final = next((v for s, v in reversed(evals) if s == final_step), None) if final_step else None
    reached = next((s for s, v in evals if v >= target), None)
    summary_file = run_dir / "summary.json"
    seconds = None
    if summary_file.is_file():
        try:
            seconds = json.loads(summary_file.read_text()).get("seconds")
        except json.JSONDecodeError:
            pass
    samples = series.get("train/samples_generated")
    updates = series.get("train/updates")
    informative = series.get("train/informative_group_frac")
    return RunSummary(
        run_dir=str(run_dir),
        seed=seed,
        steps=final_step,
        accuracy_start=start,
        accuracy_final=final,
        steps_to_target=reached,
        entropy_final=tail_mean("train/entropy"),
        length_final=tail_mean("train/response_length_mean"),
        truncated_final=tail_mean("train/truncated_frac"),
        informative_frac=float(informative[1].mean()) if informative is not None else None,
        samples_generated=float(samples[1].sum()) if samples is not None else 0.0,
        updates=float(updates[1].sum()) if updates is not None else 0.0,
        seconds=seconds,
        eval_curve=evals,
        curves={key: curve(key) for key in _CURVES},
        pass_at_k=read_pass_at_k(run_dir / PASS_AT_K_FILE),
    )


def _mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else 0.0)


def format_number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(values: Sequence[float | None], digits: int = 3) -> str:
    stats = _mean_std(values)
    if stats is None:
        return "-"
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


@dataclass(frozen=True)
class Effect:
    """A paired difference over seeds, ``treatment − control`` per seed, with its 95% t-interval."""

    treatment: str  # rung labels
    control: str
    seeds: list[int]
    differences: list[float]
    mean: float
    low: float  # 95% interval (equal to the mean with a single seed)
    high: float

    @property
    def excludes_zero(self) -> bool:
        return len(self.differences) > 1 and (self.low > 0 or self.high < 0)


def paired_effect(treatment: str, control: str, treated: dict[int, float], baseline: dict[int, float],
                  level: float = 0.95) -> Effect | None:
    """The mean of ``treated[s] − baseline[s]`` over the seeds both have, and its Student-t interval.

    Returns None when no seed is shared.
    """
    seeds = sorted(set(treated) & set(baseline))
    if not seeds:
        return None
    diffs = [treated[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Effect(treatment, control, seeds, diffs, mean, mean, mean)
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Effect(treatment, control, seeds, diffs, mean, mean - half, mean + half)


def _table(rows: list[dict[str, str]]) -> list[str]:
    headers = list(rows[0])
    return (["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            + ["| " + " | ".join(row[h] for h in headers) + " |" for row in rows])


def steps_to_target_or_budget(run: RunSummary) -> int:
    """Steps to the target, or the run's length when it never got there (a lower bound)."""
    return run.steps_to_target if run.steps_to_target is not None else run.steps


@dataclass
class AblationReport:
    plan: AblationPlan
    runs: dict[str, list[RunSummary]]  # rung name -> one summary per finished seed, in seed order
    failures: dict[str, str]
    start_pass_at_k: dict[int, float] | None = None  # the start policy's (seed 0's samples)

    def _label(self, name: str) -> str:
        return next(r.label for r in self.plan.rungs if r.name == name)

    def _by_seed(self, name: str, value) -> dict[int, float]:
        return {r.seed: value(r) for r in self.runs.get(name, []) if value(r) is not None}

    def effects(self) -> list[Effect]:
        """Final held-out accuracy, each rung against the rung below it, then DAPO against naive GRPO."""
        present = [r.name for r in self.plan.rungs if self.runs.get(r.name)]
        pairs = list(zip(present[1:], present[:-1]))
        if {"dapo", "grpo"} <= set(present) and ("dapo", "grpo") not in pairs:
            pairs.append(("dapo", "grpo"))
        out = []
        for treatment, control in pairs:
            effect = paired_effect(self._label(treatment), self._label(control),
                                   self._by_seed(treatment, lambda r: r.accuracy_final), self._by_seed(control, lambda r: r.accuracy_final))
            if effect is not None:
                out.append(effect)
        return out

    def steps_ratio(self, treatment: str = "dapo", control: str = "grpo") -> tuple[float, float] | None:
        """Mean steps to the target of ``treatment`` and of ``control`` (a seed that never got there
        counts its whole run, a lower bound); None when either rung has no run."""
        a, b = self.runs.get(treatment), self.runs.get(control)
        if not a or not b:
            return None
        return statistics.fmean(map(steps_to_target_or_budget, a)), statistics.fmean(map(steps_to_target_or_budget, b))

    def steps_to_match(self, treatment: str = "dapo", control: str = "grpo") -> list[tuple[int, int | None, int]]:
        """Per seed both rungs ran: ``(seed, first evaluated step at which treatment's held-out accuracy
        reaches control's final accuracy (None = never), control's steps)``.

        The DAPO paper's headline ("50% of the training steps") is this measure: DAPO against the
        baseline's final score, not against a fixed threshold.
        """
        controls = {r.seed: r for r in self.runs.get(control, [])}
        out = []
        for run in self.runs.get(treatment, []):
            base = controls.get(run.seed)
            if base is None or base.accuracy_final is None:
                continue
            reached = next((step for step, value in run.eval_curve if value >= base.accuracy_final), None)
            out.append((run.seed, reached, base.steps))
        return out

    def rows(self) -> list[dict[str, str]]:
        """One table row per rung (cells already formatted)."""
        rows = []
        for rung in self.plan.rungs:
            runs = self.runs.get(rung.name, [])
            reached = [r.steps_to_target for r in runs]
            hit = [s for s in reached if s is not None]
            to_target = ", ".join("n.r." if s is None else str(s) for s in reached) if runs else "-"
            if hit:
                to_target += f" (reached {len(hit)}/{len(runs)})"
            seconds = [r.seconds for r in runs if r.seconds is not None]
            rows.append({
                "rung": rung.label,
                "seeds": str(len(runs)),
                "start acc": _pm([r.accuracy_start for r in runs]),
                "final held-out acc": _pm([r.accuracy_final for r in runs]),
                f"steps to ≥{self.plan.target:g}": to_target,
                "final entropy": _pm([r.entropy_final for r in runs]),
                "final resp. length": _pm([r.length_final for r in runs], 2),
                "final truncated": _pm([r.truncated_final for r in runs]),
                "informative groups": _pm([r.informative_frac for r in runs], 2),
                "samples generated": _pm([r.samples_generated for r in runs], 0),
                "policy updates": "/".join(sorted({f"{r.updates:.0f}" for r in runs})) or "-",
                "s / run": f"{statistics.fmean(seconds):.0f}" if seconds else "-",
            })
        return rows

    def effect_rows(self) -> list[dict[str, str]]:
        return [{
            "change": f"{e.treatment} vs {e.control}",
            "seeds": str(len(e.seeds)),
            "Δ final acc (points)": f"{100 * e.mean:+.1f}",
            "95% interval": f"[{100 * e.low:+.1f}, {100 * e.high:+.1f}]",
            "excludes 0": "yes" if e.excludes_zero else "no",
            "per seed": " ".join(f"{100 * d:+.1f}" for d in e.differences),
        } for e in self.effects()]

    def pass_at_k_rows(self) -> list[dict[str, str]]:
        ks = sorted({k for runs in self.runs.values() for r in runs for k in (r.pass_at_k or {})} | set(self.start_pass_at_k or {}))
        if not ks:
            return []
        rows = []
        if self.start_pass_at_k:
            rows.append({"policy": "start (before RL)", "seeds": "-", **{f"pass@{k}": format_number(self.start_pass_at_k.get(k)) for k in ks}})
        for rung in self.plan.rungs:
            runs = [r for r in self.runs.get(rung.name, []) if r.pass_at_k]
            if runs:
                rows.append({"policy": rung.label, "seeds": str(len(runs)),
                             **{f"pass@{k}": _pm([r.pass_at_k.get(k) for r in runs]) for k in ks}})
        return rows

    def markdown(self) -> str:
        rows = self.rows()
        if not rows:
            return "(no rungs)"
        p = self.plan
        lines = _table(rows) + [
            "",
            f"{len(p.seeds)} seed(s) ({', '.join(map(str, p.seeds))}), {p.steps} steps per run; mean ± std over seeds. "
            f"Held-out accuracy is avg@k on the held-out set; steps to target lists each seed's first evaluation at "
            f"or above {p.target:g} (n.r. = not reached). Entropy, response length and truncated fraction are means "
            f"over the last {FINAL_WINDOW} steps; informative groups (0 < correct < G) is the mean over all steps of "
            f"the fraction of generated groups that were informative; samples generated counts every sampled response.",
        ]
        ratio = self.steps_ratio()
        if ratio is not None and ratio[1] > 0:
            lines += ["", f"Steps to ≥{p.target:g}, mean over seeds (a seed that never got there counts its whole run): "
                          f"DAPO {ratio[0]:.1f}, naive GRPO {ratio[1]:.1f}: DAPO needs **{100 * ratio[0] / ratio[1]:.0f}%** "
                          f"of naive GRPO's steps."]
        matched = self.steps_to_match()
        if matched:
            fractions = [(step if step is not None else total) / total for _, step, total in matched]
            never = sum(step is None for _, step, _ in matched)
            lines += ["", "Steps for DAPO to reach naive GRPO's final held-out accuracy (same seed; the paper's "
                          "'50% of the training steps' measure): "
                          + ", ".join(f"{'never' if step is None else step} of {total}" for _, step, total in matched)
                          + f"; mean **{100 * statistics.fmean(fractions):.0f}%** of naive GRPO's steps"
                          + (f" ({never} seed(s) never got there, counted as 100%)" if never else "") + "."]
        effect_rows = self.effect_rows()
        if effect_rows:
            lines += ["", "Paired effects on final held-out accuracy (same seed, treatment − control; Student-t 95% interval):", ""]
            lines += _table(effect_rows)
        pass_rows = self.pass_at_k_rows()
        if pass_rows:
            lines += ["", "pass@k of the final policies on the held-out set (unbiased estimator; mean ± std over seeds):", ""]
            lines += _table(pass_rows)
        user = [o for o in p.overrides if o not in p.pinned]
        if p.base_config:
            lines.append(f"\nEvery run's settings come from `{p.base_config}`, under the overrides and the rung's switches.")
        if p.pinned:
            lines.append(f"\nEvery run starts from the same policy: `{' '.join(p.pinned)}` (the built-in warm-up).")
        if user:
            lines.append(f"\nOverrides: `{' '.join(user)}`.")
        if self.failures:
            lines.append("\nFailed runs: " + "; ".join(f"{k}: {v}" for k, v in self.failures.items()))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.plan.steps, "seeds": self.plan.seeds, "target": self.plan.target,
            "base_config": self.plan.base_config, "overrides": self.plan.overrides,
            "rungs": [asdict(r) for r in self.plan.rungs],
            "runs": {name: [asdict(s) for s in runs] for name, runs in self.runs.items()},
            "effects": [asdict(e) for e in self.effects()],
            "steps_to_match_grpo": [{"seed": seed, "dapo_step": step, "grpo_steps": total} for seed, step, total in self.steps_to_match()],
            "start_pass_at_k": self.start_pass_at_k,
            "failures": self.failures,
        }

    def write(self, out: str | Path) -> list[Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table = out / "ablation.md"
        table.write_text(f"# Ablation ladder\n\n{self.markdown()}\n")
        data = out / "ablation.json"
        data.write_text(json.dumps(self.to_json(), indent=1))
        figure = plot_ablation(self, out / "ablation.png")
        return [table, figure, data]


# ----------------------------------------------------------------------------- figure


def _band(curves: list[list[tuple[int, float]]]):
    """Mean and std over seeds at the steps every seed logged."""
    import numpy as np

    if not curves or any(not c for c in curves):
        return None
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    if not common:
        return None
    table = np.array([[dict(c)[s] for s in common] for c in curves])
    return np.array(common), table.mean(axis=0), table.std(axis=0)


def plot_ablation(report: AblationReport, path: str | Path) -> Path:
    """One PNG: per rung (mean over seeds, shaded ± std) held-out accuracy, entropy, response length,
    truncation, informative groups and samples generated against the step; pass@k of the start
    and final policies; and the final accuracy per rung as bars."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 9), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    panels = (
        ("eval", "Held-out accuracy", "accuracy (avg@k)"),
        ("train/entropy", "Policy entropy", "nats / token"),
        ("train/response_length_mean", "Mean response length", "tokens"),
        ("train/truncated_frac", "Truncated responses", "fraction"),
        ("train/informative_group_frac", "Informative groups (0 < correct < G) among those generated", "fraction"),
        ("train/samples_generated_total", "Samples generated (cumulative)", "samples"),
    )
    for ax, (key, title, ylabel) in zip(axes, panels):
        for i, rung in enumerate(report.plan.rungs):
            runs = report.runs.get(rung.name, [])
            curves = [r.eval_curve if key == "eval" else r.curves.get(key, []) for r in runs]
            band = _band(curves)
            if band is None:
                continue
            steps, mean, std = band
            color = f"C{i}"
            # Alternating dashes: a rung whose switch changed nothing retraces the rung below it
            # exactly; drawn dashed on top of a solid line, both stay visible.
            ax.plot(steps, mean, color=color, linewidth=1.6, linestyle=("--", "-")[i % 2],
                    marker="o" if key == "eval" else None, markersize=3, label=f"{i + 1}. {rung.label}")
            if len(curves) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        if key == "eval":
            ax.axhline(report.plan.target, color="grey", linestyle=":", linewidth=1)
            ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("training step (equal policy updates per step in every rung)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    _plot_pass_at_k(report, axes[6])
    bars = axes[7]
    labels, means, stds, colors = [], [], [], []
    for i, rung in enumerate(report.plan.rungs):
        stats = _mean_std([r.accuracy_final for r in report.runs.get(rung.name, [])])
        labels.append(f"{i + 1}")
        means.append(stats[0] if stats else 0.0)
        stds.append(stats[1] if stats else 0.0)
        colors.append(f"C{i}")
    x = np.arange(len(labels))
    bars.bar(x, means, yerr=stds, color=colors, capsize=4)
    for i, rung in enumerate(report.plan.rungs):
        for r in report.runs.get(rung.name, []):
            if r.accuracy_final is not None:
                bars.plot(i, r.accuracy_final, "k.", markersize=5)
    bars.set_xticks(x, [f"{i + 1}. {r.name}" for i, r in enumerate(report.plan.rungs)], rotation=30, ha="right", fontsize=8)
    for i, (mean, std) in enumerate(zip(means, stds)):
        bars.annotate(f"{mean:.3f}", (i, mean + std), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    # Zoomed in: the rungs differ by a few points, invisible on a 0-1 axis. The bottom is printed
    # on the axis, so the zoom cannot mislead.
    finals = [r.accuracy_final for runs in report.runs.values() for r in runs if r.accuracy_final is not None]
    bottom = max(0.0, math.floor((min(finals) - 0.05) * 20) / 20) if finals else 0.0
    bars.set_ylim(bottom, 1)
    bars.set_ylabel("accuracy (avg@k; axis does not start at 0)")
    bars.set_title("Final held-out accuracy (mean ± std, dots = seeds)", fontsize=11)
    bars.grid(True, axis="y", alpha=0.3)
    task = Path(report.plan.base_config).name if report.plan.base_config else "the built-in task"
    fig.suptitle(f"DAPO ablation ladder on {task}: {len(report.plan.seeds)} seed(s), {report.plan.steps} steps", fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _plot_pass_at_k(report: AblationReport, ax) -> None:
    """pass@k against k (log scale): the start policy, and each rung's final policies (mean ± std over seeds)."""
    import numpy as np

    if report.start_pass_at_k:
        ks = sorted(report.start_pass_at_k)
        ax.plot(ks, [report.start_pass_at_k[k] for k in ks], color="black", linestyle=":", marker="s", markersize=3,
                label="start (before RL)")
    for i, rung in enumerate(report.plan.rungs):
        runs = [r.pass_at_k for r in report.runs.get(rung.name, []) if r.pass_at_k]
        if not runs:
            continue
        ks = sorted(set.intersection(*(set(r) for r in runs)))
        table = np.array([[r[k] for k in ks] for r in runs])
        ax.errorbar(ks, table.mean(axis=0), yerr=table.std(axis=0) if len(runs) > 1 else None, color=f"C{i}",
                    linestyle=("--", "-")[i % 2], marker="o", markersize=3, capsize=3, label=f"{i + 1}. {rung.label}")
    ax.set_xscale("log", base=2)
    ax.set_title("pass@k of the final policies (held-out)", fontsize=11)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "not evaluated (--pass-at-k 0)", ha="center", va="center", transform=ax.transAxes)
