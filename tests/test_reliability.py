"""Faults that must not lose work (issue 5): exact resume after SIGKILL, SIGINT/SIGTERM,
reward functions that raise or hang, non-finite updates, and dynamic sampling out of rounds.

The kill tests drive real ``python -m dapo_rl.cli train`` processes. They run as concurrent
scenarios (one thread each, waiting on its subprocess) because process start-up, mostly
importing torch and transformers, dominates their cost on a 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dapo_rl.cli import main
from dapo_rl.config import load_config
from dapo_rl.rewards import RewardFunctionWarning
from dapo_rl.telemetry import read_metrics
from dapo_rl.training import trainer as trainer_module
from dapo_rl.training.checkpoint import (
    latest_checkpoint,
    save_checkpoint,
    valid_checkpoints,
)
from dapo_rl.models.loading import load_policy
from dapo_rl.training.compose import encoded_prompts, reward_function, rollout_engine
from dapo_rl.training.trainer import Trainer

# Small enough for seconds per run, big enough to exercise everything a checkpoint must carry:
# several updates, dynamic sampling with carried surplus and its rate estimate, periodic
# evaluation, LR warm-up, and the prompt stream's difficulty memory (16 prompts: revisited every
# few steps, so prompts get retired and unsolved ones skipped). No over-sampling margin, so that
# some steps need a second generation round. Temperature 0.7, so that whole groups solve the easy
# prompts and several get retired (at 1.0 whether any was retired in 6 steps was up to the draws).
SMALL = [
    "steps=6", "prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16",
    "eval.interval=3", "data.builtin_eval_size=32", "data.builtin_train_size=16", "checkpoint.interval=1",
    "logging.progress=false", "data.retire_solved_after=1", "data.unsolved_weight=0.5",
    "dynamic_sampling.oversample_margin=1", "rollout.temperature=0.7",
]
TIMEOUT_S = 300  # per subprocess; generous, the machine may be shared
_LIVE: list[subprocess.Popen] = []  # every process started here, killed if a scenario fails


@pytest.fixture(scope="module")
def cache(request) -> str:
    """The quickstart model cache: ``$DAPO_RL_TEST_CACHE`` when set (a folder reused across
    sessions, e.g. ~/.cache/dapo-rl, to skip the warm-up), else the session's fresh one."""
    return os.environ.get("DAPO_RL_TEST_CACHE") or request.getfixturevalue("quickstart_cache")


def _deterministic(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock measurements (time/*, perf/*), which no rerun reproduces."""
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Train:
    """One ``dapo train`` subprocess of a scenario, with its output in ``<run_dir>.<n>.log``."""

    def __init__(self, cache: str, run_dir: Path, *extra: str, leg: int = 0, new_session: bool = False):
        self.run_dir = run_dir
        self.log_path = run_dir.parent / f"{run_dir.name}.{leg}.log"
        # The machine's default thread count, as a user runs it: resume must be exact there too
        # (issue 16; a thread-timed reduction would show up as a differing step or final hash).
        env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
               "DAPO_RL_CACHE": cache, "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "dapo_rl.cli", "train", *SMALL, f"quickstart.cache_dir={cache}",
                f"output_dir={run_dir}", *extra]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in finish(), after the process ends
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=new_session)
        _LIVE.append(self.proc)

    def wait_until(self, condition, what: str) -> None:
        """Poll ``condition()`` until true; fail if the process ends first or time runs out."""
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"process ended (rc {self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(0.02)

    def finish(self) -> int:
        try:
            rc = self.proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"timed out:\n{self.output()}") from None
        self._log.close()
        return rc

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()


def _logged_steps(run_dir: Path) -> set[int]:
    path = run_dir / "metrics.jsonl"
    return {row["step"] for row in read_metrics(path)} if path.is_file() else set()


def _result(run_dir: Path, rcs: list[int], outputs: list[str]) -> dict:
    return {
        "rcs": rcs,
        "outputs": outputs,
        "rows": _deterministic(read_metrics(run_dir / "metrics.jsonl")),
        "final": _sha256(run_dir / "final" / "model.safetensors"),
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


# ----------------------------------------------------------------------------- scenarios


def _reference(cache: str, root: Path) -> dict:
    run = Train(cache, root / "reference")
    return _result(run.run_dir, [run.finish()], [run.output()])


def _sigkill_chain(cache: str, root: Path) -> dict:
    """SIGKILL right after step 1 is logged (mid-checkpoint or early step 2), resume; SIGKILL
    once step 4's checkpoint exists (inside step 5), resume; run to the end."""
    run_dir = root / "sigkill"
    first = Train(cache, run_dir)
    first.wait_until(lambda: 1 in _logged_steps(run_dir), "step 1 logged")
    first.proc.send_signal(signal.SIGKILL)
    rcs, outputs = [first.finish()], [first.output()]
    second = Train(cache, run_dir, "resume=true", leg=1)
    second.wait_until(lambda: (run_dir / "checkpoints" / "step_000004" / "COMPLETE").is_file(), "checkpoint 4")
    second.proc.send_signal(signal.SIGKILL)
    rcs.append(second.finish())
    outputs.append(second.output())
    third = Train(cache, run_dir, "resume=true", leg=2)
    rcs.append(third.finish())
    outputs.append(third.output())
    return _result(run_dir, rcs, outputs)


def _graceful(cache: str, root: Path, sig: int) -> dict:
    """``sig`` once step 2 is logged; record what was saved; resume to the end.

    SIGINT goes to the whole process group, as a terminal's Ctrl-C does (helper processes such
    as reward verifiers get it too); SIGTERM to the main process, as a job scheduler sends it.
    """
    run_dir = root / signal.Signals(sig).name.lower()
    first = Train(cache, run_dir, new_session=True)
    first.wait_until(lambda: 2 in _logged_steps(run_dir), "step 2 logged")
    if sig == signal.SIGINT:
        os.killpg(first.proc.pid, sig)
    else:
        first.proc.send_signal(sig)
    rc = first.finish()
    stopped = {"logged": max(_logged_steps(run_dir)), "checkpoint": latest_checkpoint(run_dir),
               "final_exists": (run_dir / "final").exists()}
    second = Train(cache, run_dir, "resume=true", leg=1)
    result = _result(run_dir, [rc, second.finish()], [first.output(), second.output()])
    result["stopped"] = stopped
    return result


@pytest.fixture(scope="module")
def scenarios(cache, tmp_path_factory) -> dict:
    """Run the reference and the interrupted runs concurrently; each returns its metrics."""
    root = tmp_path_factory.mktemp("reliability")
    jobs = {
        "reference": lambda: _reference(cache, root),
        "sigkill": lambda: _sigkill_chain(cache, root),
        "sigterm": lambda: _graceful(cache, root, signal.SIGTERM),
        "sigint": lambda: _graceful(cache, root, signal.SIGINT),
    }
    pool = ThreadPoolExecutor(len(jobs))
    try:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}
    finally:
        for proc in _LIVE:  # a failed scenario must not leave the others' processes running
            if proc.poll() is None:
                proc.kill()
        pool.shutdown(wait=True)


def _assert_same_run(result: dict, reference: dict) -> None:
    assert reference["rcs"] == [0], reference["outputs"][0]
    assert [row["step"] for row in result["rows"]] == list(range(7)), "each step logged exactly once"
    for mine, ref in zip(result["rows"], reference["rows"]):
        assert mine == ref, f"step {ref['step']} differs after resume"
    assert result["final"] == reference["final"], "final weights differ from the uninterrupted run"
    for key in ("accuracy_before", "accuracy_after", "steps"):
        assert result["summary"][key] == reference["summary"][key]


def test_reference_run_exercises_what_a_checkpoint_must_carry(scenarios):
    rows = scenarios["reference"]["rows"]
    assert scenarios["reference"]["rcs"] == [0]
    train_rows = [r for r in rows if r["step"] > 0]
    assert any(r["train/generation_rounds"] > 1 for r in train_rows), "no step needed a second generation round"
    pool, carried = 0.0, []
    for r in train_rows:  # informative groups found minus groups trained = surplus carried on
        pool += r["train/informative_group_frac"] * r["train/samples_generated"] / 4 - r["train/batch_groups"]
        carried.append(round(pool))
    assert any(c > 0 for c in carried[:-1]), "no surplus group was carried into a later step"
    assert any(r["sampling/surplus_carried"] > 0 for r in train_rows)
    assert train_rows[-2]["sampling/prompts_retired"] > 0, "no prompt was retired before the last step"
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 3, 6]


def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(scenarios):
    result = scenarios["sigkill"]
    assert result["rcs"] == [-signal.SIGKILL, -signal.SIGKILL, 0], result["outputs"]
    # The first kill may land before step 1's checkpoint is complete (the run then starts over);
    # the second comes after checkpoint 4 is complete, so the last leg must resume.
    assert "resumed from" in result["outputs"][2]
    _assert_same_run(result, scenarios["reference"])


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(scenarios, sig, exit_code):
    result = scenarios[signal.Signals(sig).name.lower()]
    first_output = result["outputs"][0]
    assert result["rcs"] == [exit_code, 0], first_output
    assert "Traceback" not in first_output
    last_line = first_output.strip().splitlines()[-1]
    assert signal.Signals(sig).name in last_line and "resume=true" in last_line
    stopped = result["stopped"]
    # Every logged step is in the checkpoint: nothing done before the signal is lost.
    assert stopped["checkpoint"] is not None and stopped["checkpoint"].name == f"step_{stopped['logged']:06d}"
    assert stopped["logged"] < 6 and not stopped["final_exists"]
    _assert_same_run(result, scenarios["reference"])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(scenarios, cache, tmp_path):
    """A kill during the first evaluation, then kills at random moments of later legs (inside
    steps, evaluations, checkpoint writes, the final save) until one leg finishes."""
    rng = random.Random(20251125)
    run_dir = tmp_path / "random-kills"
    leg = Train(cache, run_dir)
    leg.wait_until(lambda: (run_dir / "config.yaml").is_file(), "the run folder written")
    leg.proc.kill()
    rcs = [leg.finish()]
    for n in range(1, 12):
        leg = Train(cache, run_dir, "resume=true", leg=n)
        logged = len(read_metrics(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").is_file() else 0
        # Each leg makes progress (a new metrics line), then dies a random moment later.
        while leg.proc.poll() is None and (not (run_dir / "metrics.jsonl").is_file()
                                           or len(read_metrics(run_dir / "metrics.jsonl")) <= logged):
            time.sleep(0.02)
        deadline = time.monotonic() + rng.uniform(0.0, 2.0)
        while time.monotonic() < deadline and leg.proc.poll() is None:
            time.sleep(0.01)
        if leg.proc.poll() is None:
            leg.proc.kill()
        rcs.append(leg.finish())
        if rcs[-1] == 0:
            break
    assert rcs[-1] == 0 and -signal.SIGKILL in rcs[1:], rcs
    _assert_same_run({"rows": _deterministic(read_metrics(run_dir / "metrics.jsonl")),
                      "final": _sha256(run_dir / "final" / "model.safetensors"),
                      "summary": json.loads((run_dir / "summary.json").read_text())}, scenarios["reference"])


# ----------------------------------------------------------------------------- in-process faults

FAST = ["steps=2", "prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16",
        "data.eval=null", "data.builtin_train_size=256", "logging.progress=false"]


def _write_module(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(body)
    return name


def test_reward_that_raises_or_hangs_counts_as_failed_and_training_continues(tmp_path, cache, monkeypatch, capfd):
    # Call i (0-based, 16 per step): i % 8 == 0 raises, i % 8 == 1 hangs past the timeout, the
    # rest alternate right/wrong, so every group stays informative and each step has 4 failures.
    module = _write_module(tmp_path, "faulty_reward_mod", """
import itertools, time
_calls = itertools.count()

def reward(response, ground_truth, metadata):
    i = next(_calls)
    if i % 8 == 0:
        raise ZeroDivisionError("boom")
    if i % 8 == 1:
        time.sleep(3)
    return i % 2 == 0
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    with pytest.warns(RewardFunctionWarning) as caught:
        rc = main(["train", *FAST, f"quickstart.cache_dir={cache}", f"output_dir={out}",
                   f"reward.function={module}:reward", "reward.timeout_s=0.3", "dynamic_sampling.max_rounds=1",
                   "dynamic_sampling.oversample_margin=1"])  # exactly 4 prompts (16 calls) per step
    assert rc == 0, capfd.readouterr().err
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["train/reward_failures"] for r in rows] == [4.0, 4.0]
    assert all(r["train/updates"] == 1.0 for r in rows)
    messages = " ".join(str(w.message) for w in caught)
    assert "ZeroDivisionError" in messages and "did not return within 0.3 s" in messages


def _build_trainer(cache: str, *overrides: str) -> Trainer:
    config = load_config(None, [*FAST, f"quickstart.cache_dir={cache}", "output_dir=unused", *overrides])
    torch.manual_seed(0)
    model, tokenizer = load_policy(config.model.path, quickstart=config.quickstart, seed=config.seed, progress=False)
    prompts = encoded_prompts(config, "train", tokenizer)
    return Trainer(config, model, tokenizer, prompts, None, reward_function(config), rollout_engine(config, model, tokenizer),
                   device=torch.device("cpu"))


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_update_is_skipped_counted_and_leaves_weights_untouched(cache, monkeypatch, capsys):
    trainer = _build_trainer(cache)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = trainer_module.aggregate_loss
    for skipped, poison in enumerate([lambda loss: loss * float("nan"),  # NaN loss
                                      lambda loss: _InfGradient.apply(loss)], start=1):  # finite loss, Inf gradient
        monkeypatch.setattr(trainer_module, "aggregate_loss", lambda *a, poison=poison, **k: poison(real(*a, **k)))
        metrics = trainer.train_step()
        assert metrics["train/skipped_updates"] == 1.0 and metrics["train/updates"] == 0.0
        assert trainer.state.skipped_updates_total == skipped
        assert "non-finite loss or gradient; update skipped" in capsys.readouterr().out
        after = trainer.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a skipped update changed the weights"
        assert not trainer.optimizer.state, "a skipped update touched the optimiser moments"

    monkeypatch.setattr(trainer_module, "aggregate_loss", real)
    metrics = trainer.train_step()  # the same trainer recovers: the next update is applied
    assert metrics["train/skipped_updates"] == 0.0 and trainer.state.skipped_updates_total == 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_dynamic_sampling_out_of_rounds_errors_keeps_progress_then_resumes_with_train(tmp_path, cache, monkeypatch, capfd):
    # The first 16 calls (step 1) alternate right/wrong; afterwards everything is right, so no
    # group is informative and step 2 cannot be filled.
    module = _write_module(tmp_path, "saturating_reward_mod", """
import itertools
_calls = itertools.count()

def reward(response, ground_truth, metadata):
    i = next(_calls)
    return True if i >= 16 else i % 2 == 0
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    common = [*FAST, f"quickstart.cache_dir={cache}", f"output_dir={out}", f"reward.function={module}:reward",
              "dynamic_sampling.max_rounds=2", "checkpoint.interval=0"]
    capfd.readouterr()
    rc = main(["train", *common, "dynamic_sampling.on_exhausted=error"])
    err = capfd.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "dynamic_sampling.max_rounds" in lines[0] and "on_exhausted=train" in lines[0] and "resume=true" in lines[0]
    # Step 1's metrics and a checkpoint of the progress survive, although checkpoint.interval=0.
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert [p.name for p in valid_checkpoints(out)] == ["step_000001"]
    assert not (out / "final").exists()

    rc = main(["train", *common, "dynamic_sampling.on_exhausted=train", "resume=true"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "found 0 of 4 informative groups in 2 rounds; update skipped" in captured.out
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["train/sampling_exhausted"] == 1.0
    assert rows[1]["train/batch_groups"] == 0.0 and rows[1]["train/updates"] == 0.0


# ----------------------------------------------------------------------------- checkpoint files


def test_checkpoint_resave_prune_and_recovery_never_leave_a_gap(tmp_path, cache):
    trainer = _build_trainer(cache)
    run = tmp_path / "run"
    for step in (1, 2, 3):
        trainer.state.step = step
        save_checkpoint(trainer, run, keep_last=2)
    assert [p.name for p in valid_checkpoints(run)] == ["step_000002", "step_000003"]
    # A kill during an earlier save leaves a staging folder; it is never taken for a checkpoint
    # and the next save clears it.
    (run / "checkpoints" / ".tmp-step_000004").mkdir()
    assert latest_checkpoint(run).name == "step_000003"
    # A kill between the two renames of a re-save leaves the old copy aside: it is recovered.
    (run / "checkpoints" / "step_000003").rename(run / "checkpoints" / ".old-step_000003")
    assert latest_checkpoint(run).name == "step_000003"
    save_checkpoint(trainer, run, keep_last=2)  # re-save of step 3
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    assert trainer.checkpointed_step == 3


def test_a_checkpoints_policy_folder_loads_with_its_tokenizer(tmp_path, cache):
    """``dapo eval RUN/checkpoints/step_N/policy`` works: the folder holds the tokenizer too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = _build_trainer(cache)
    trainer.state.step = 1
    folder = save_checkpoint(trainer, tmp_path / "run", keep_last=1) / "policy"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("12=")["input_ids"] == trainer.tokenizer("12=")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == trainer.model.config.vocab_size
