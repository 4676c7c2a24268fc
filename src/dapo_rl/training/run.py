"""Compose a training run from a :class:`~dapo_rl.config.Config`: model, data, reward, engine,
sinks, the trainer loop, checkpoints, evaluation before and after, and the final policy folder
(the run folder's own rules live in :mod:`dapo_rl.training.run_folder`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Self

import torch
from tqdm.auto import tqdm

from dapo_rl.algorithm import DynamicSamplingExhausted
from dapo_rl.config import Config, ConfigError, to_dict
from dapo_rl.errors import one_line
from dapo_rl.reproducibility import reproducible_torch
from dapo_rl.telemetry import build_sinks
from dapo_rl.training.compose import (
    check_config,
    encoded_prompts,
    policy_and_tokenizer,
    reward_function,
    rollout_engine,
    training_autocast,
    training_device,
)
from dapo_rl.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    valid_checkpoints,
)
from dapo_rl.rollout.base import EngineLost
from dapo_rl.tools import EnvironmentFailures
from dapo_rl.training.errors import RunError, RunFailed, RunInterrupted, signal_name
from dapo_rl.training.host_memory import keep_freed_host_memory, release_freed_host_memory
from dapo_rl.training.distributed import DistContext, init_distributed, shutdown_distributed
from dapo_rl.training.run_folder import check_output_dir, prepare_output_dir, save_final_policy, trim_metrics, write_json
from dapo_rl.training.trainer import Trainer

__all__ = ["RunError", "RunFailed", "RunHooks", "RunInterrupted", "RunParts", "RunResult", "run_training"]


@dataclass
class RunParts:
    """What a Python caller (``DAPOTrainer``) hands in instead of what the config names: each
    ``None`` is built from the config as ``dapo train`` builds it."""

    model: torch.nn.Module | None = None  # the policy, adapters already added (model.*)
    tokenizer: Any = None  # its tokenizer; None = the one model.path's folder holds
    reward_functions: list[Callable[..., Any]] | None = None  # TRL-style functions (reward.functions)


class RunHooks:
    """Where a caller follows the run (transformers' ``TrainerCallback`` events; ``DAPOTrainer``
    bridges them). Every method does nothing here; ``step_end`` returns true to stop the run
    after that step (checkpointed, as a signal would)."""

    def train_begin(self, trainer: Trainer) -> None:
        """The trainer is built (and restored from a checkpoint when resuming); nothing trained yet."""

    def log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Metrics were logged: the evaluation before training, then every step's."""

    def step_end(self, trainer: Trainer, metrics: dict[str, float]) -> bool:
        """Step ``trainer.state.step`` is done (its metrics logged); true = stop after it."""
        return False

    def save(self, trainer: Trainer, folder: Path | None) -> None:
        """A checkpoint was written to ``folder``."""

    def train_end(self, trainer: Trainer, result: RunResult) -> None:
        """The run ended normally and the final policy is saved."""


def _check_sinks_available(config: Config) -> None:
    """Optional metric backends are imported late; find a missing one before anything is written."""
    import importlib.util

    for sink, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if sink in config.logging.sinks and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging.sinks: {sink} is not installed; pip install 'dapo-rl[{sink}]' or remove it from logging.sinks")


@dataclass
class RunResult:
    run_dir: Path
    accuracy_before: float | None
    accuracy_after: float | None
    steps: int
    seconds: float
    history: list[dict[str, float]]


def _postfix(metrics: dict[str, float], eval_acc: float | None) -> dict[str, str]:
    out = {
        "acc": f"{metrics.get('train/accuracy', 0):.2f}",
        "H": f"{metrics.get('train/entropy', 0):.2f}",
        "len": f"{metrics.get('train/response_length_mean', 0):.1f}",
        "trunc": f"{metrics.get('train/truncated_frac', 0):.2f}",
        "rounds": f"{metrics.get('train/generation_rounds', 0):.0f}",
        "s/step": f"{metrics.get('time/step_s', 0):.2f}",
    }
    if eval_acc is not None:
        out["eval"] = f"{eval_acc:.3f}"
    return out


class _StopOnSignal:
    """SIGINT / SIGTERM handlers for the training loop (a context manager).

    The first signal only raises a flag: the trainer finishes the step it is in, saves a
    checkpoint and the run exits with 128 + the signal number. Stopping between steps is what
    makes the checkpoint exact; a second signal, for a user who cannot wait, stops at once
    (the last complete checkpoint stays valid: checkpoints are written atomically).
    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise RunInterrupted(signum, f"stopped at once by a second {signal_name(signum)}; "
                                         f"the last complete checkpoint is kept, continue with resume=true")
        self.signum = signum
        # os.write, not print: a handler may run while the main thread is inside a print call.
        note = (f"\n{signal_name(signum)} received: finishing the current step, then saving a checkpoint and "
                f"exiting (send it again to stop at once)\n")
        try:
            os.write(sys.stderr.fileno(), note.encode())
        except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file
            pass


def _restore(trainer: Trainer, run_dir: Path) -> Path | None:
    """Load the newest checkpoint that loads; an unreadable one is reported and skipped."""
    problems = []
    for folder in reversed(valid_checkpoints(run_dir)):
        try:
            load_checkpoint(trainer, folder)
            return folder
        except Exception as exc:  # noqa: BLE001 - a damaged file: fall back to the previous checkpoint
            problems.append(f"{folder.name}: {one_line(exc)}")
            tqdm.write(f"resume: cannot load {folder} ({one_line(exc)}); trying the previous checkpoint")
    if problems:
        raise RunError(f"resume: no checkpoint in {run_dir / 'checkpoints'} could be loaded ({'; '.join(problems[:2])}); "
                       f"use overwrite=true to start the run over")
    return None


def _agreed(stop: Callable[[], bool], dist: DistContext, device: torch.device) -> Callable[[], bool]:
    """A stop flag every rank agrees on (any rank signalled → all stop after the same step)."""
    if not dist.enabled:
        return stop
    return lambda: dist.all_reduce_sum([1.0 if stop() else 0.0], device)[0] > 0


def _follow(trainer: Trainer, dist: DistContext, resumed: bool) -> RunResult:
    """A non-main rank: train in lock-step with the main rank and take part in its collectives
    (evaluation and saving gather the parameters under FSDP2); write nothing."""
    if trainer.eval_prompts and not resumed:
        trainer.evaluate()  # the main rank's "before" evaluation
    with _StopOnSignal() as stop:
        try:
            for _ in trainer.steps(should_stop=_agreed(stop, dist, trainer.device)):
                pass
        except DynamicSamplingExhausted:
            pass  # the main rank reports it
    if trainer.state.step == trainer.cfg.steps:
        dist.full_model_state(trainer.model)  # the main rank saves the final policy
    return RunResult(run_dir=Path(trainer.cfg.output_dir), accuracy_before=None, accuracy_after=None,
                     steps=trainer.state.step, seconds=0.0, history=trainer.state.history)


def run_training(config: Config, parts: RunParts | None = None, hooks: RunHooks | None = None) -> RunResult:
    """Train as configured; returns held-out accuracy before and after, and the per-step history.

    Every input (model, data, reward, engine, output folder, metric backends) is checked before
    anything in ``output_dir`` is written or removed, so a mistake costs nothing.

    Raises:
        ConfigError, RunError: bad input (the message names the key or file and the fix), or a
            dynamic sampler out of rounds under ``on_exhausted=error`` (after saving a checkpoint).
        RunInterrupted: SIGINT or SIGTERM stopped the run (after saving a checkpoint).

    ``parts`` replace what the config would build (a model object, reward callables); ``hooks``
    follow the run. ``dapo train`` passes neither; ``DAPOTrainer`` both: one loop behind both doors.
    """
    started = time.perf_counter()
    check_config(config)
    dist = init_distributed(config.model.device, config.distributed.strategy, config.distributed.reshard_after_forward)
    try:
        device = training_device(config, dist.local_rank)
        with reproducible_torch(config.reproducible, device, notice=tqdm.write):
            return _run_training(config, dist, started, device, parts or RunParts(), hooks or RunHooks())
    finally:
        # Only a group this run joined (torchrun): an in-process vLLM engine creates a
        # single-process group of its own and destroys it, with its subgroups, when it shuts down.
        if dist.enabled:
            shutdown_distributed()
        release_freed_host_memory()  # the heap kept for the next step is not kept for the next run


def _run_training(config: Config, dist: DistContext, started: float, device: torch.device, parts: RunParts,
                  hooks: RunHooks) -> RunResult:
    progress = config.logging.progress and dist.is_main
    keep_freed_host_memory()  # every step frees and re-allocates the same buffers
    torch.manual_seed(config.seed + dist.rank)  # ranks sample different responses
    _check_sinks_available(config)
    check_output_dir(config)
    if parts.model is None:
        model, tokenizer = policy_and_tokenizer(config, progress)
    else:
        model, tokenizer = parts.model, parts.tokenizer
    model.to(device)
    reward_fn = reward_function(config, parts.reward_functions)
    train_prompts = encoded_prompts(config, "train", tokenizer)
    eval_prompts = encoded_prompts(config, "eval", tokenizer) if config.data.eval else None
    precision = training_autocast(config, model, device, dist)  # after the data checks: bad input probes nothing
    engine = rollout_engine(config, model, tokenizer, dist)
    if config.model.dtype == "auto" and dist.is_main:  # once every part is built: bad input prints only its error
        tqdm.write(f"model.dtype={precision.reason}")
    if engine.precision_reason and config.rollout.dtype == "auto" and dist.is_main:
        tqdm.write(f"rollout.dtype={engine.precision_reason}")
    if config.reproducible and engine.own_weights and dist.is_main:
        tqdm.write(f"reproducible=true: rollout.engine={config.rollout.engine} samples with {engine.describe()}, which does "
                   f"not promise bit-identical samples between runs; the update itself stays deterministic")
    try:
        return _train_with(config, dist, started, model, tokenizer, reward_fn, train_prompts, eval_prompts, engine,
                           device, precision.autocast_dtype, progress, hooks)
    finally:
        engine.close()  # stops a server this run launched


def _engine_lost(exc: EngineLost, run_dir: Path, engine) -> RunFailed:
    """The one line for an engine that stopped answering (the progress is checkpointed)."""
    return RunFailed(f"rollout.engine: {engine.describe()} stopped answering ({one_line(exc, 300)}); progress is "
                     f"checkpointed in {latest_checkpoint(run_dir)}; {engine.resume_advice()}")


def _train_with(config: Config, dist: DistContext, started: float, model, tokenizer, reward_fn, train_prompts,
                eval_prompts, engine, device, autocast_dtype, progress: bool, hooks: RunHooks) -> RunResult:
    run_dir = Path(config.output_dir)

    def checkpoint(t: Trainer) -> None:
        folder = save_checkpoint(t, run_dir, config.checkpoint.keep_last)
        if dist.is_main:
            hooks.save(t, folder)

    # Only the main rank writes (checkpoints, metrics, the final policy); the others take part in
    # gathering the state to write.
    trainer = Trainer(config, model, tokenizer, train_prompts, eval_prompts, reward_fn, engine, device=device,
                      autocast_dtype=autocast_dtype, dist=dist, checkpoint_fn=checkpoint)
    checkpoint = _restore(trainer, run_dir) if config.resume else None
    if dist.is_main:
        run_dir = prepare_output_dir(config)  # the first write: every input above is good
    dist.barrier()
    if not dist.is_main:
        return _follow(trainer, dist, resumed=checkpoint is not None)
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    if checkpoint is not None:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        tqdm.write(f"resumed from {checkpoint} (step {trainer.state.step})")
    # Metric lines after the checkpoint (or all of them, when starting over) will be logged
    # again. Trimmed before the JSONL sink opens the file for appending.
    kept = trim_metrics(run_dir, trainer.state.step if checkpoint is not None else -1)
    sinks = build_sinks(run_dir, config.logging.sinks, config.logging.run_name or run_dir.name, to_dict(config),
                        wandb_project=config.logging.wandb_project, wandb_mode=config.logging.wandb_mode)
    def log(metrics: dict[str, float], step: int) -> None:
        sinks.log(metrics, step)
        hooks.log(trainer, metrics)

    trainer.log = log
    hooks.train_begin(trainer)
    stop_asked = False

    before = summary.get("accuracy_before")
    bar = None
    try:
        with _StopOnSignal() as stop:
            # A resumed run never re-evaluates "before": the checkpoint's RNG state is the one
            # after that evaluation, and the uninterrupted run did not evaluate twice.
            if eval_prompts and checkpoint is None:
                result = trainer.evaluate()
                before = result.avg_at_k
                tqdm.write(f"held-out accuracy before training: {before:.3f} (avg@{config.eval.samples_per_prompt} over {len(eval_prompts)} prompts)")
                summary["accuracy_before"] = before
                summary["eval_before"] = result.metrics()
                log(result.metrics(), 0)
                write_json(summary_path, summary)
            # The progress bar shows the latest held-out accuracy: after a resume, the last one logged.
            last_eval = next((row["eval/accuracy"] for row in reversed(kept) if "eval/accuracy" in row), before)
            bar = tqdm(total=config.steps, initial=trainer.state.step, desc="dapo train", disable=not progress, dynamic_ncols=True)
            # A callback's stop joins the signal flag that every rank agrees on.
            for metrics in trainer.steps(should_stop=_agreed(lambda: stop() or stop_asked, dist, device)):
                last_eval = metrics.get("eval/accuracy", last_eval)
                bar.set_postfix(_postfix(metrics, last_eval), refresh=False)
                bar.update(1)
                stop_asked = bool(hooks.step_end(trainer, metrics))
    except EngineLost as exc:
        raise _engine_lost(exc, run_dir, engine) from None
    except EnvironmentFailures as exc:
        raise RunFailed(f"{exc}; progress is checkpointed in {latest_checkpoint(run_dir)}: continue it with resume=true") from None
    except DynamicSamplingExhausted:
        raise RunError(
            f"dynamic_sampling.max_rounds: step {trainer.state.step + 1} found only {trainer.sampler.pooled} of "
            f"{config.prompts_per_step} informative groups in {trainer.sampler.rounds} generation rounds; raise "
            f"dynamic_sampling.max_rounds, or set dynamic_sampling.on_exhausted=train to train on what was found "
            f"(progress so far is in {latest_checkpoint(run_dir)}: continue it with resume=true)"
        ) from None
    finally:
        if bar is not None:
            bar.close()
        sinks.close()
    if stop.signum is not None and trainer.state.step < config.steps:
        summary["seconds"] = summary.get("seconds", 0.0) + time.perf_counter() - started
        write_json(summary_path, summary)
        raise RunInterrupted(stop.signum, f"stopped by {signal_name(stop.signum)} after step {trainer.state.step} of {config.steps}; "
                                          f"checkpoint saved in {latest_checkpoint(run_dir)}; continue with resume=true")
    if stop_asked and trainer.state.step < config.steps:
        summary["seconds"] = summary.get("seconds", 0.0) + time.perf_counter() - started
        write_json(summary_path, summary)
        tqdm.write(f"stopped by a callback after step {trainer.state.step} of {config.steps}; checkpoint saved in "
                   f"{latest_checkpoint(run_dir)}; continue with resume=true")
        return RunResult(run_dir=run_dir, accuracy_before=before, accuracy_after=None, steps=trainer.state.step,
                         seconds=time.perf_counter() - started, history=trainer.state.history)
    after = trainer.state.history[-1].get("eval/accuracy") if trainer.state.history and eval_prompts else None
    final = save_final_policy(model, tokenizer, run_dir, state_dict=dist.full_model_state(model) if dist.sharded else None)
    summary.update({"accuracy_after": after, "steps": trainer.state.step, "final_policy": str(final),
                    "seconds": summary.get("seconds", 0.0) + time.perf_counter() - started})
    write_json(summary_path, summary)
    if after is not None and before is not None:
        tqdm.write(f"held-out accuracy: {before:.3f} -> {after:.3f} ({(after - before) * 100:+.1f} points)")
        calls_before = summary.get("eval_before", {}).get("eval/tool_calls_mean")
        calls_after = trainer.state.history[-1].get("eval/tool_calls_mean")
        if calls_before is not None and calls_after is not None:  # multi-turn with tools
            tqdm.write(f"held-out tool calls per trajectory: {calls_before:.2f} -> {calls_after:.2f}")
    tqdm.write(f"final policy saved to {final}")
    result = RunResult(run_dir=run_dir, accuracy_before=before, accuracy_after=after, steps=trainer.state.step,
                       seconds=time.perf_counter() - started, history=trainer.state.history)
    hooks.train_end(trainer, result)
    return result

