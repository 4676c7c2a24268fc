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
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from dapo_rl.config import BUILTIN_PREFIX, Config, ConfigError, PromptFields, load_config, to_dict
from dapo_rl.evaluation.evaluate_model import EvalOptions, evaluate_model
from dapo_rl.experiments.ablation_report import (
    BASE_PASS_AT_K_FILE,
    DEFAULT_TARGET,
    PASS_AT_K_FILE,
    AblationReport,
    RunSummary,
    format_number,
    read_pass_at_k,
    summarize_run,
)

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

# Shared by every rung: the task and budget of the ablation (see docs/ablation.md for why and for
# the measured properties of the task).
# - The task is builtin:chain-long (2-10 digits) from its own warmed-up policy: short problems
#   are often solved and long ones rarely, so a batch mixes all-correct, mixed and all-wrong
#   groups, and responses run from 5 to 13 tokens before any re-check (builtin:chain spans 5-9).
# - Four optimiser updates per step (mini_batch_size = prompts_per_step / 4): with a single
#   on-policy update the importance ratio is exactly 1, nothing is ever clipped and clip-higher
#   could not matter at all.
# - rollout.max_response_length 16: the warm-up's "=S" re-checks push long answers over it.
#   cache_length 3 starts the soft penalty above 13 tokens, the longest re-check-free answer
#   (10 running sums + "#d" + EOS), so a clean answer is never punished.
# - Dynamic sampling trains on what it found rather than failing a whole run when a late,
#   accurate policy leaves few informative groups (the "updates" column shows whether that ever
#   cost an update); with four updates per step a group carried one step is 4 updates old, and
#   the default age bound of 1 would drop every carried group.
# - Evaluation every 2 steps on 256 held-out problems x 4 samples: steps-to-target needs the
#   resolution, and evaluating the tiny model costs little next to its training steps.
ABLATION_DEFAULTS: dict[str, Any] = {
    "model.path": "builtin:chain-long-tiny",
    "data.train": "builtin:chain-long",
    "data.eval": "builtin:chain-long",
    "prompts_per_step": 8,
    "mini_batch_size": 2,
    "micro_batch_size": 16,
    "rollout.max_response_length": 16,
    "overlong.cache_length": 3,
    "dynamic_sampling.max_rounds": 8,
    "dynamic_sampling.on_exhausted": "train",
    "dynamic_sampling.max_surplus_age": 4,
    "eval.interval": 2,
    "eval.samples_per_prompt": 4,
    "data.builtin_eval_size": 256,
    "checkpoint.interval": 0,
    "logging.progress": False,
}
DEFAULT_STEPS = 60
DEFAULT_SEEDS = 5
DEFAULT_PASS_AT_K = 16
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
        previous = load_config(stored, [], saved_run=True)
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


def _execute(jobs_list: list[tuple[str, Callable[..., Any], tuple]], jobs: int,
             done: Callable[[str, float | None, BaseException | None], str], echo: Callable[[str], None], what: str) -> None:
    """Run each ``(name, function, args)``: in this process, or ``jobs`` at a time in worker processes
    that share the CPU threads. ``function`` returns its wall seconds; ``done`` turns a result or an
    error into the progress line. One failed job never stops the others."""
    total = len(jobs_list)
    if not total:
        return
    if jobs == 1 or total == 1:
        for i, (name, function, args) in enumerate(jobs_list, start=1):
            echo(f"[{i}/{total}] {name}: {what} ...")
            try:
                line = done(name, function(*args), None)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failed run must not cost the others
                line = done(name, None, exc)
            echo(f"[{i}/{total}] {name}: {line}")
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # fork after torch threads exist can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_prepare_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(function, *args): name for name, function, args in jobs_list}
        echo(f"{what}: {total} jobs, {jobs} at a time ({threads} torch thread(s) each) ...")
        for i, future in enumerate(as_completed(futures), start=1):
            name = futures[future]
            try:
                line = done(name, future.result(), None)
            except Exception as exc:
                line = done(name, None, exc)
            echo(f"[{i}/{total}] {name}: {line}")


def _pass_at_k_one(model: str, config: Config, k: int, output: str) -> float:
    """`dapo eval` of ``model`` on the run's held-out set, ``k`` samples per problem at the run's
    evaluation temperature and response cap, written to ``output``; returns the wall seconds."""
    started = time.perf_counter()
    d = config.data
    prompt_fields = {f.name: getattr(d, f.name) for f in fields(PromptFields)}
    options = EvalOptions(**prompt_fields, k=k, temperature=config.eval.temperature, top_p=config.eval.top_p,
                          max_response_length=config.rollout.max_response_length, reward=config.reward.function,
                          seed=config.seed, greedy=False, progress=False, output=output, overwrite=True)
    options.max_rows = None  # every held-out problem (data.max_rows caps the training set)
    evaluate_model(model, d.eval, options, echo=False)  # the ablation prints its own table
    return time.perf_counter() - started


def _pass_at_k_jobs(plan: AblationPlan, k: int) -> list[tuple[str, Callable[..., Any], tuple]]:
    """The pass@k evaluations not yet written: the start policy's (with the first rung's seed-0
    settings) and each finished run's final policy."""
    first = plan.config(plan.rungs[0], plan.seeds[0])
    if first.data.eval is None:
        return []
    out: list[tuple[str, Callable[..., Any], tuple]] = []
    start_file = plan.out / BASE_PASS_AT_K_FILE
    if _evaluated_k(start_file) != k:
        out.append(("start policy", _pass_at_k_one, (first.model.path, first, k, str(start_file))))
    for seed in plan.seeds:
        for rung in plan.rungs:
            config = plan.config(rung, seed)
            run_dir = Path(config.output_dir)
            result = run_dir / PASS_AT_K_FILE
            if run_status(config) == "done" and _evaluated_k(result) != k:
                out.append((f"{rung.name}/seed{seed}", _pass_at_k_one, (str(run_dir / "final"), config, k, str(result))))
    return out


def _evaluated_k(path: Path) -> int | None:
    """The k a pass@k file was evaluated with (its largest pass@j is pass@k), None without one."""
    passed = read_pass_at_k(path)
    return max(passed) if passed else None


def _resolve_base_model(overrides: Sequence[str], base_config: str | Path | None) -> list[str]:
    """Pin ``model.path`` of the built-in policy to its warm-up folder (built once, seed BASE_MODEL_SEED)."""
    probe = rung_config(RUNGS[0], BASE_MODEL_SEED, 1, "unused", overrides, base_config)
    if not probe.model.path.startswith(BUILTIN_PREFIX):
        return list(overrides)
    from dapo_rl.models.quickstart import builtin_model_task, prepare_quickstart_model

    try:
        task = builtin_model_task(probe.model.path)
    except ValueError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    folder = prepare_quickstart_model(probe.quickstart, seed=BASE_MODEL_SEED, progress=probe.logging.progress, task=task)
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
    pass_at_k: int = 0,
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
        pass_at_k: after training, evaluate the start policy and every final policy with this many
            samples per held-out problem (pass@1, 2, 4, ... up to it; 0 = skip). Results already
            written are kept.
        echo: where progress lines go.
    """
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    if pass_at_k < 0:
        raise ConfigError(f"--pass-at-k: must be >= 0 (0 skips it), got {pass_at_k}")
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

    training = [(f"{rung.name}/seed{seed}", seed, config) for rung, seed, config in todo]  # name = run folder under out
    seed_of = {name: seed for name, seed, _ in training}

    def trained(name: str, seconds: float | None, error: BaseException | None) -> str:
        if error is not None:
            failures[name] = f"{type(error).__name__}: {error}"
            return f"FAILED ({failures[name]})"
        summary = summarize_run(out / name, seed_of[name], target)
        return (f"held-out accuracy {format_number(summary.accuracy_start)} -> {format_number(summary.accuracy_final)} "
                f"in {seconds:.0f} s ({time.perf_counter() - started:.0f} s elapsed)")

    def evaluated(name: str, seconds: float | None, error: BaseException | None) -> str:
        if error is not None:  # the report lists it; the command exits 1 as for a failed run
            failures[f"{name} pass@{pass_at_k}"] = message = f"{type(error).__name__}: {error}"
            return f"FAILED ({message})"
        return f"{seconds:.0f} s"

    _execute([(name, _train_one, (config,)) for name, _, config in training], jobs, trained, echo, what=f"training {steps} steps")
    if pass_at_k:
        _execute(_pass_at_k_jobs(plan, pass_at_k), jobs, evaluated, echo, what=f"pass@{pass_at_k} on the held-out set")
    report = build_report(plan, failures)
    written = report.write(out)
    echo(report.markdown())
    for path in written:
        echo(str(path))
    return report


# ----------------------------------------------------------------------------- report


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
            runs.setdefault(rung.name, []).append(summarize_run(run_dir, seed, plan.target))
    return AblationReport(plan, runs, failures, start_pass_at_k=read_pass_at_k(plan.out / BASE_PASS_AT_K_FILE))
