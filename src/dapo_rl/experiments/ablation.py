"""The DAPO ablation ladder (paper Table 1) on the built-in task: six rungs × several seeds.

Each rung adds one DAPO technique to the previous one::

    1 grpo             naive GRPO: symmetric clip 0.2, seq-mean-token-mean loss, no overlong
                       handling, no dynamic sampling
    2 overlong_filter  + overlong filtering (truncated responses leave the loss)
    3 clip_higher      + clip-higher (eps_high 0.28)
    4 soft_punishment  + soft overlong punishment
    5 token_loss       + token-level loss (token-mean)
    6 dapo             + dynamic sampling (= DAPO)

Every rung runs the same number of training steps, hence the same number of policy updates
(``prompts_per_step / mini_batch_size`` per step); dynamic sampling pays for its informative
batches with extra generation, which the report counts as samples generated.

Runs go to ``OUT/<rung>/seed<k>/`` as ordinary ``dapo train`` run folders; a run whose folder
already holds a finished run with the same configuration is skipped, so an interrupted ablation
continues where it stopped. The report is a markdown table (``OUT/ablation.md``), a figure
(``OUT/ablation.png``) and the per-run numbers (``OUT/ablation.json``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from dapo_rl.config import BUILTIN_MODEL, Config, ConfigError, load_config, to_dict

# The five switches the ladder turns; a rung fixes all of them, so pass-through overrides may not.
RUNG_KEYS: tuple[str, ...] = (
    "clip.eps_low",
    "clip.eps_high",
    "loss.agg_mode",
    "overlong.filter",
    "overlong.soft_punishment",
    "dynamic_sampling.enabled",
)
# Keys the command sets itself (from --seeds/--steps/--out), so an override would be ignored or wrong.
RESERVED_KEYS: tuple[str, ...] = ("seed", "steps", "output_dir", "resume", "overwrite")


@dataclass(frozen=True)
class Rung:
    """One rung: a folder name, a table label and the full setting of every switch."""

    name: str
    label: str
    settings: dict[str, Any]


def _build_ladder() -> tuple[Rung, ...]:
    naive = {
        "clip.eps_low": 0.2,
        "clip.eps_high": 0.2,
        "loss.agg_mode": "seq-mean-token-mean",
        "overlong.filter": False,
        "overlong.soft_punishment": False,
        "dynamic_sampling.enabled": False,
    }
    additions = (
        ("grpo", "naive GRPO", {}),
        ("overlong_filter", "+ overlong filtering", {"overlong.filter": True}),
        ("clip_higher", "+ clip-higher (0.28)", {"clip.eps_high": 0.28}),
        ("soft_punishment", "+ soft overlong punishment", {"overlong.soft_punishment": True}),
        ("token_loss", "+ token-level loss", {"loss.agg_mode": "token-mean"}),
        ("dapo", "+ dynamic sampling (DAPO)", {"dynamic_sampling.enabled": True}),
    )
    rungs, settings = [], dict(naive)
    for name, label, change in additions:
        settings = {**settings, **change}  # cumulative: each rung keeps the techniques before it
        rungs.append(Rung(name, label, dict(settings)))
    return tuple(rungs)


RUNGS: tuple[Rung, ...] = _build_ladder()

# Shared by every rung: the task and budget of the ablation (see docs/ablation.md for why).
# - Four optimiser updates per step (mini_batch_size = prompts_per_step / 4): with a single
#   on-policy update the importance ratio is exactly 1, nothing is ever clipped and clip-higher
#   could not matter at all; with two, the one off-policy update clips ~0.1% of tokens.
# - rollout.max_response_length 12 (default 16): the warm-up's "=S" re-checks then truncate
#   ~10-15% of responses at the start instead of ~4%, so overlong filtering and the soft
#   punishment have responses to act on. cache_length 3 starts the penalty above 9 tokens, the
#   length of the longest re-check-free answer (6 running sums + "#d" + EOS), so a clean answer
#   is never punished.
# - Dynamic sampling trains on what it found rather than failing a whole run when a late,
#   accurate policy leaves few informative groups; the "updates" column shows whether that
#   ever cost an update.
# - A smaller held-out set evaluated more often: steps-to-target needs the resolution, and the
#   evaluation must not dominate the run time on a shared 2-core CPU.
ABLATION_DEFAULTS: dict[str, Any] = {
    "prompts_per_step": 8,
    "mini_batch_size": 2,
    "micro_batch_size": 16,
    "rollout.max_response_length": 12,
    "overlong.cache_length": 3,
    "dynamic_sampling.max_rounds": 8,
    "dynamic_sampling.on_exhausted": "train",
    # Four optimiser updates per step (8 groups / mini-batches of 2): a group carried one step is
    # 4 updates old, and the default bound of 1 update would drop every carried group.
    "dynamic_sampling.max_surplus_age": 4,
    "eval.interval": 5,
    "eval.samples_per_prompt": 4,
    "data.builtin_eval_size": 128,
    "checkpoint.interval": 0,
    "logging.progress": False,
}
DEFAULT_STEPS = 40
DEFAULT_SEEDS = 3
DEFAULT_TARGET = 0.8
# Final entropy / length / truncation are means over this many last steps: one step's value is
# a single noisy batch.
FINAL_WINDOW = 5
# The built-in policy is warmed up once, with this seed, and every rung and seed starts from
# it: the seeds then vary the RL run (sampling, prompt order), not the starting model, whose
# accuracy differs a lot between warm-up seeds.
BASE_MODEL_SEED = 0


def select_rungs(spec: str | Sequence[str] | None) -> list[Rung]:
    """Rungs named by ``spec``: comma-separated names or 1-based numbers (None = all six), in ladder order."""
    if spec is None:
        return list(RUNGS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    by_name = {r.name: r for r in RUNGS}
    chosen: set[str] = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if item.isdigit() and 1 <= int(item) <= len(RUNGS):
            chosen.add(RUNGS[int(item) - 1].name)
        elif item in by_name:
            chosen.add(item)
        else:
            names = ", ".join(f"{i + 1}={r.name}" for i, r in enumerate(RUNGS))
            raise ConfigError(f"--rungs: unknown rung {item!r}; use numbers or names ({names})")
    if not chosen:
        raise ConfigError("--rungs: no rung given; e.g. --rungs 1,6 or --rungs grpo,dapo")
    return [r for r in RUNGS if r.name in chosen]


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].strip()


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse overrides of what each rung or the command itself decides."""
    for item in overrides:
        key = _key_of(item)
        if key in RUNG_KEYS:
            raise ConfigError(f"{key}: set by each rung of the ladder, not overridable; see `dapo ablate --help` for the rungs")
        if key in RESERVED_KEYS:
            option = {"seed": "--seeds", "steps": "--steps", "output_dir": "--out"}.get(key)
            fix = f"use {option}" if option else "an interrupted ablation resumes by itself"
            raise ConfigError(f"{key}: set by `dapo ablate` for each run; {fix}")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rung_config(rung: Rung, seed: int, steps: int, out: str | Path, overrides: Sequence[str] = (),
                base_config: str | Path | None = None) -> Config:
    """The training config of one run: defaults ← :data:`ABLATION_DEFAULTS` ← overrides ← rung ← run,
    or, with ``base_config`` (a YAML file such as a recipe), defaults ← that file ← overrides ← rung
    ← run: :data:`ABLATION_DEFAULTS` fit the built-in task only.

    The rung's switches and the run's seed, steps and folder come last, so they always hold.
    """
    check_overrides(overrides)
    layers = [] if base_config else [f"{k}={_format_value(v)}" for k, v in ABLATION_DEFAULTS.items()]
    layers += list(overrides)
    layers += [f"{k}={_format_value(v)}" for k, v in rung.settings.items()]
    layers += [f"seed={seed}", f"steps={steps}", f"output_dir={Path(out) / rung.name / f'seed{seed}'}"]
    return load_config(str(base_config) if base_config else None, layers)


# ----------------------------------------------------------------------------- running

_VOLATILE_KEYS = ("resume", "overwrite")


def _comparable(config: Config) -> dict[str, Any]:
    data = to_dict(config)
    for key in _VOLATILE_KEYS:
        data.pop(key, None)
    return data


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} there, {vb!r} now")
    return out


def run_status(config: Config) -> str:
    """``"done"`` (finished with this config), ``"partial"`` (started, same config) or ``"new"``.

    Raises:
        ConfigError: the folder holds a run with a different configuration; it is never overwritten.
    """
    run_dir = Path(config.output_dir)
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return "new"
    try:
        previous = load_config(stored, [])
    except ConfigError as exc:
        raise ConfigError(f"{run_dir}: unreadable config.yaml ({exc}); delete that run folder or use another --out") from None
    diffs = _differences(_comparable(previous), _comparable(config))
    if diffs:
        raise ConfigError(f"{run_dir} holds a run with another configuration ({'; '.join(diffs[:3])}); "
                          f"use another --out, or delete that folder to rerun it")
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except json.JSONDecodeError:
            return "partial"
        if data.get("steps") == config.steps and "accuracy_after" in data and (run_dir / "metrics.jsonl").is_file():
            return "done"
    return "partial"


def _prepare_worker(threads: int | None) -> None:
    """Per-process setup: torch threads (so parallel runs do not oversubscribe the cores), quiet HF logs."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _train_one(config: Config) -> float:
    """Train one run (resuming a partial one); returns its wall time. Top-level so it pickles for worker processes."""
    from dapo_rl.training.run import run_training

    started = time.perf_counter()
    run_training(config)
    return time.perf_counter() - started


def _resolve_base_model(overrides: Sequence[str], base_config: str | Path | None) -> list[str]:
    """Pin ``model.path`` of the built-in policy to its warm-up folder (built once, seed BASE_MODEL_SEED)."""
    probe = rung_config(RUNGS[0], BASE_MODEL_SEED, 1, "unused", overrides, base_config)
    if probe.model.path != BUILTIN_MODEL:
        return list(overrides)
    from dapo_rl.models.quickstart import prepare_quickstart_model

    folder = prepare_quickstart_model(probe.quickstart, seed=BASE_MODEL_SEED, progress=probe.logging.progress)
    return [*overrides, f"model.path={folder}"]


@dataclass
class AblationPlan:
    rungs: list[Rung]
    seeds: list[int]
    steps: int
    out: Path
    overrides: list[str]
    target: float = DEFAULT_TARGET
    pinned: list[str] = field(default_factory=list)  # overrides the command added itself (the base model)
    base_config: str | None = None  # YAML file under the overrides (None: the built-in task's defaults)

    def config(self, rung: Rung, seed: int) -> Config:
        return rung_config(rung, seed, self.steps, self.out, self.overrides, self.base_config)


def run_ablation(
    rungs: Sequence[Rung],
    seeds: int | Sequence[int],
    steps: int,
    out: str | Path,
    overrides: Sequence[str] = (),
    *,
    target: float = DEFAULT_TARGET,
    jobs: int = 1,
    base_config: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> "AblationReport":
    """Train every (rung, seed) not already finished in ``out``, then write and return the report.

    Args:
        rungs: the rungs to run (see :func:`select_rungs`).
        seeds: a count (seeds 0..N-1) or explicit seeds.
        steps: training steps per run (equal for every rung, hence equal policy updates).
        out: ablation folder; each run goes to ``out/<rung>/seed<k>``.
        overrides: ``key=value`` settings for every run, on top of :data:`ABLATION_DEFAULTS`
            (or of ``base_config``).
        target: held-out accuracy for the steps-to-target column.
        jobs: runs trained at once, in separate processes sharing the CPU threads.
        base_config: a training YAML (e.g. ``recipes/smollm2-135m-arithmetic.yaml``) to run the
            ladder on instead of the built-in task.
        echo: where progress lines go.
    """
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ConfigError("--seeds: need at least one seed")
    check_overrides(overrides)
    out = Path(out)
    resolved = _resolve_base_model(overrides, base_config)
    plan = AblationPlan(list(rungs), seed_list, steps, out, resolved, target, pinned=resolved[len(overrides):],
                        base_config=str(base_config) if base_config else None)
    todo: list[tuple[Rung, int, Config]] = []
    # Seed-major order: an ablation stopped early still has every rung for its first seeds.
    for seed in plan.seeds:
        for rung in plan.rungs:
            config = plan.config(rung, seed)
            status = run_status(config)  # raises before any training if a folder holds something else
            if status == "done":
                echo(f"{rung.name}/seed{seed}: already finished, skipped")
                continue
            if status == "partial":
                # Continue from its last checkpoint, or start it again if it has none.
                config = replace(config, resume=True)
            todo.append((rung, seed, config))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failures: dict[str, str] = {}
    total = len(todo)

    def finished(i: int, rung: Rung, seed: int, seconds: float | None, error: BaseException | None) -> None:
        name = f"{rung.name}/seed{seed}"
        if error is not None:
            failures[name] = f"{type(error).__name__}: {error}"
            echo(f"[{i}/{total}] {name}: FAILED ({failures[name]})")
            return
        summary = summarize_run(out / rung.name / f"seed{seed}", target)
        echo(f"[{i}/{total}] {name}: held-out accuracy {_num(summary.accuracy_start)} -> {_num(summary.accuracy_final)} "
             f"in {seconds:.0f} s ({time.perf_counter() - started:.0f} s elapsed)")

    if jobs == 1 or total <= 1:
        for i, (rung, seed, config) in enumerate(todo, start=1):
            echo(f"[{i}/{total}] {rung.name}/seed{seed}: training {steps} steps ...")
            try:
                seconds = _train_one(config)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failed run must not cost the others
                finished(i, rung, seed, None, exc)
                continue
            finished(i, rung, seed, seconds, None)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")  # fork after torch threads exist can deadlock
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_prepare_worker,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_train_one, config): (rung, seed) for rung, seed, config in todo}
            echo(f"training {total} runs, {jobs} at a time ({threads} torch thread(s) each) ...")
            for i, future in enumerate(as_completed(futures), start=1):
                rung, seed = futures[future]
                try:
                    finished(i, rung, seed, future.result(), None)
                except Exception as exc:
                    finished(i, rung, seed, None, exc)
    report = build_report(plan, failures)
    written = report.write(out)
    echo(report.markdown())
    for path in written:
        echo(str(path))
    return report


# ----------------------------------------------------------------------------- results


@dataclass
class RunSummary:
    """The numbers the report needs from one finished run's metrics.jsonl."""

    run_dir: str
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


_CURVES = ("train/entropy", "train/response_length_mean", "train/truncated_frac", "train/samples_generated_total",
           "train/informative_group_frac")


def summarize_run(run_dir: str | Path, target: float = DEFAULT_TARGET, window: int = FINAL_WINDOW) -> RunSummary:
    """Read one run folder's metrics into a :class:`RunSummary`."""
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
    )


def _mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else 0.0)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(values: Sequence[float | None], digits: int = 3) -> str:
    stats = _mean_std(values)
    if stats is None:
        return "-"
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


@dataclass
class AblationReport:
    plan: AblationPlan
    runs: dict[str, list[RunSummary]]  # rung name -> one summary per finished seed, in seed order
    failures: dict[str, str]

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

    def markdown(self) -> str:
        rows = self.rows()
        if not rows:
            return "(no rungs)"
        headers = list(rows[0])
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row[h] for h in headers) + " |" for row in rows]
        p = self.plan
        notes = [
            "",
            f"{len(p.seeds)} seed(s) ({', '.join(map(str, p.seeds))}), {p.steps} steps per run; mean ± std over seeds. "
            f"Held-out accuracy is avg@k on the held-out set; steps to target lists each seed's first evaluation at "
            f"or above {p.target:g} (n.r. = not reached). Entropy, response length and truncated fraction are means "
            f"over the last {FINAL_WINDOW} steps; informative groups (0 < correct < G) is the mean over all steps of "
            f"the fraction of generated groups that were informative; samples generated counts every sampled response.",
        ]
        user = [o for o in p.overrides if o not in p.pinned]
        if p.base_config:
            notes.append(f"Every run's settings come from `{p.base_config}`, under the overrides and the rung's switches.")
        if p.pinned:
            notes.append(f"Every run starts from the same policy: `{' '.join(p.pinned)}` (the built-in warm-up, seed {BASE_MODEL_SEED}).")
        if user:
            notes.append(f"Overrides: `{' '.join(user)}`.")
        if self.failures:
            notes.append("Failed runs: " + "; ".join(f"{k}: {v}" for k, v in self.failures.items()))
        return "\n".join(lines + notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.plan.steps, "seeds": self.plan.seeds, "target": self.plan.target,
            "base_config": self.plan.base_config, "overrides": self.plan.overrides,
            "rungs": [asdict(r) for r in self.plan.rungs],
            "runs": {name: [asdict(s) for s in runs] for name, runs in self.runs.items()},
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


def build_report(plan: AblationPlan, failures: dict[str, str] | None = None) -> AblationReport:
    """Summaries of every finished run of the plan (unfinished ones are left out and named in failures)."""
    runs: dict[str, list[RunSummary]] = {}
    failures = dict(failures or {})
    for rung in plan.rungs:
        for seed in plan.seeds:
            run_dir = plan.out / rung.name / f"seed{seed}"
            name = f"{rung.name}/seed{seed}"
            if run_status(plan.config(rung, seed)) != "done":
                failures.setdefault(name, "not finished")
                continue
            runs.setdefault(rung.name, []).append(summarize_run(run_dir, plan.target))
    return AblationReport(plan, runs, failures)


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
    """One PNG: held-out accuracy, entropy, response length, truncation and samples generated per rung
    (mean over seeds, shaded ± std), and the final accuracy per rung as bars."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    panels = (
        ("eval", "Held-out accuracy", "accuracy (avg@k)"),
        ("train/entropy", "Policy entropy", "nats / token"),
        ("train/response_length_mean", "Mean response length", "tokens"),
        ("train/truncated_frac", "Truncated responses", "fraction"),
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
    bars = axes[5]
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
    fig.suptitle(f"DAPO ablation ladder on the built-in task: {len(report.plan.seeds)} seed(s), {report.plan.steps} steps",
                 fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
