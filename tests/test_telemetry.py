"""Tests for dapo_rl.telemetry: metric sinks read back from what they wrote, and plots that are
real images."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dapo_rl.telemetry import (
    FIGURE_NAMES,
    METRICS_FILENAME,
    JsonlSink,
    MetricSink,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    build_sinks,
    load_series,
    plot_runs,
    read_metrics,
    summary_table,
)

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'dapo-rl[tensorboard]')"
)
needs_wandb = pytest.mark.skipif(
    not HAS_WANDB, reason="wandb not installed (pip install 'dapo-rl[wandb]')"
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(line: str) -> dict:
    """json.loads that refuses NaN/Infinity, which other JSON readers reject."""

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_writes_exactly_what_it_receives(tmp_path: Path) -> None:
    path = tmp_path / "run" / METRICS_FILENAME
    sink = JsonlSink(path)
    sink.log({"train/reward_mean": 0.1, "train/generation_rounds": 2, "flag": True}, step=3)
    sink.log({"train/entropy": float("nan"), "a": float("inf"), "b": -float("inf")}, step=4)
    # 0-d tensors and numpy scalars come straight out of a trainer; they must land as numbers.
    sink.log({"t": torch.tensor(0.25), "n32": np.float32(0.5), "n64": np.int64(7)}, np.int64(5))
    sink.close()
    sink.close()  # idempotent

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    parsed = [_strict_json(line) for line in lines]
    assert parsed == [
        {"step": 3, "train/reward_mean": 0.1, "train/generation_rounds": 2, "flag": True},
        {"step": 4, "train/entropy": None, "a": None, "b": None},
        {"step": 5, "t": 0.25, "n32": 0.5, "n64": 7},
    ]
    assert list(parsed[0]) == ["step", "train/reward_mean", "train/generation_rounds", "flag"]
    assert '"train/entropy": null' in lines[1]
    assert read_metrics(path) == parsed
    assert read_metrics(path.parent) == parsed  # a run directory works too
    assert type(parsed[0]["train/generation_rounds"]) is int


def test_jsonl_sink_accepts_run_dir(tmp_path: Path) -> None:
    with JsonlSink(tmp_path) as sink:
        sink.log({"x": 1.0}, 0)
    assert sink.path == tmp_path / METRICS_FILENAME
    assert read_metrics(tmp_path) == [{"step": 0, "x": 1.0}]


def test_read_metrics_tolerates_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILENAME
    with JsonlSink(path) as sink:
        sink.log({"x": 1.0}, 0)
        sink.log({"x": 2.0}, 1)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"step": 2, "x": 3.')  # what a kill mid-write leaves

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected fragment must not even warn
        assert read_metrics(path) == [{"step": 0, "x": 1.0}, {"step": 1, "x": 2.0}]


def test_resume_after_truncation_keeps_every_complete_line(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILENAME
    with JsonlSink(path) as sink:
        sink.log({"x": 1.0}, 0)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"step": 1, "x"')
    # A resumed run appends to the same file; its first record must not be glued to the fragment.
    with JsonlSink(path) as sink:
        sink.log({"x": 5.0}, 1)
        sink.log({"x": 6.0}, 2)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable line\(s\).*: 2$"):
        records = read_metrics(path)
    assert records == [{"step": 0, "x": 1.0}, {"step": 1, "x": 5.0}, {"step": 2, "x": 6.0}]


def test_jsonl_lines_survive_sigkill(tmp_path: Path) -> None:
    """Each line is flushed when written, so a run killed without cleanup keeps all of them."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from dapo_rl.telemetry.sinks import JsonlSink
        sink = JsonlSink({str(tmp_path)!r})
        for step in range(3):
            sink.log({{"x": float(step)}}, step)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert read_metrics(tmp_path) == [{"step": s, "x": float(s)} for s in range(3)]


def test_jsonl_rejects_bad_input(tmp_path: Path) -> None:
    with JsonlSink(tmp_path) as sink:
        with pytest.raises(TypeError, match="step must be an int"):
            sink.log({"x": 1.0}, 1.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'name'"):
            sink.log({"name": "dapo"}, 0)  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="'step' is reserved"):
            sink.log({"step": 1.0}, 0)
    with pytest.raises(RuntimeError, match="closed"):
        sink.log({"x": 1.0}, 0)
    assert (tmp_path / METRICS_FILENAME).read_text() == ""


# ----------------------------------------------------------------------------- TensorBoard


@needs_tensorboard
def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    with TensorBoardSink(log_dir) as sink:
        sink.log({"train/reward_mean": 0.5, "train/entropy": float("nan")}, step=0)
        sink.log({"train/reward_mean": -0.25, "train/clip_frac_high": torch.tensor(0.125)}, step=3)

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # A NaN is "no value at this step", as in the JSONL file: nothing is written for it.
    assert tags == {"train/reward_mean", "train/clip_frac_high"}
    reward = [(e.step, e.value) for e in acc.Scalars("train/reward_mean")]
    assert reward == [(0, pytest.approx(0.5)), (3, pytest.approx(-0.25))]
    clip = [(e.step, e.value) for e in acc.Scalars("train/clip_frac_high")]
    assert clip == [(3, pytest.approx(0.125))]


def test_tensorboard_missing_gives_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(ImportError) as info:
        TensorBoardSink(tmp_path / "tb")
    assert str(info.value) == (
        "telemetry.sinks: tensorboard is not installed; pip install 'dapo-rl[tensorboard]'"
    )


# ----------------------------------------------------------------------------- W&B


@needs_wandb
def test_wandb_offline_writes_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)  # restored after the test
    monkeypatch.setenv("WANDB_SILENT", "true")
    with WandbSink("dapo-rl-test", "unit", {"lr": 1e-6, "group_size": 8}, dir=tmp_path) as sink:
        sink.log({"train/reward_mean": 0.5, "train/entropy": float("nan")}, step=0)
        sink.log({"train/reward_mean": 0.75}, step=1)
        run_dir = sink.run_dir
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert run_dir is not None and run_dir.is_dir(), listing
    assert run_dir.parent == tmp_path / "wandb", (run_dir, listing)
    assert run_dir.name.startswith("offline-run-"), run_dir
    records = list(run_dir.glob("*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0, listing
    # The record log is protobuf: metric names are stored as plain bytes.
    data = records[0].read_bytes()
    assert b"train/reward_mean" in data, (len(data), listing)


@needs_wandb
def test_wandb_disabled_and_bad_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    with WandbSink("p", "r", {}, mode="disabled", dir=tmp_path) as sink:
        sink.log({"x": 1.0}, 0)
        assert sink.run_dir is None
    with pytest.raises(ValueError, match=r"'cloud'.*offline, online, disabled"):
        WandbSink("p", "r", {}, mode="cloud", dir=tmp_path)


def test_wandb_missing_gives_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError) as info:
        WandbSink("p", "r", {}, dir=tmp_path)
    assert str(info.value) == (
        "telemetry.sinks: wandb is not installed; pip install 'dapo-rl[wandb]'"
    )


# ----------------------------------------------------------------------------- fan-out, factory


def test_build_sinks_rejects_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        build_sinks(tmp_path / "run", ["jsonl", "mlflow"], "r", {})
    message = str(info.value)
    assert "'mlflow'" in message and "jsonl, tensorboard, wandb" in message
    # Validation happens before anything is built: no half-made run folder.
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"'cloud'.*offline, online, disabled"):
        build_sinks(tmp_path / "run", ["wandb"], "r", {}, wandb_mode="cloud")
    assert not (tmp_path / "run").exists()


def test_build_sinks_always_includes_jsonl(tmp_path: Path) -> None:
    with build_sinks(tmp_path, [], "r", {}) as sink:
        assert [type(s) for s in sink.sinks] == [JsonlSink]
        sink.log({"x": 1.0}, 0)
    assert read_metrics(tmp_path) == [{"step": 0, "x": 1.0}]
    # Repeats and case do not build a second JSONL writer.
    with build_sinks(tmp_path, ["JSONL", "jsonl"], "r", {}) as sink:
        assert len(sink.sinks) == 1


@needs_tensorboard
def test_build_sinks_tensorboard_layout(tmp_path: Path) -> None:
    with build_sinks(tmp_path, ["tensorboard"], "r", {}) as sink:
        assert [type(s) for s in sink.sinks] == [JsonlSink, TensorBoardSink]
        sink.log({"x": 1.0}, 0)
    assert (tmp_path / METRICS_FILENAME).is_file()
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


class _Recorder(MetricSink):
    def __init__(self, fail_close: bool = False) -> None:
        self.calls: list[tuple[dict, int]] = []
        self.closed = False
        self.fail_close = fail_close

    def log(self, metrics, step):  # type: ignore[no-untyped-def]
        self.calls.append((dict(metrics), step))

    def close(self) -> None:
        self.closed = True
        if self.fail_close:
            raise OSError("disk full")


def test_multisink_fans_out_and_closes_all_even_if_one_fails() -> None:
    a, b, c = _Recorder(), _Recorder(fail_close=True), _Recorder()
    multi = MultiSink([a, b, c])
    multi.log({"x": 1.0}, 2)
    assert a.calls == b.calls == c.calls == [({"x": 1.0}, 2)]
    with pytest.raises(OSError, match="disk full"):
        multi.close()
    assert a.closed and b.closed and c.closed


# ----------------------------------------------------------------------------- plots


def _write_run(run_dir: Path, seed: int, steps: int = 30, with_diag: bool = True) -> None:
    """Synthetic training history shaped like the trainer's (eval only every 5 steps)."""
    rng = np.random.default_rng(seed)
    with JsonlSink(run_dir) as sink:
        for step in range(steps):
            progress = step / steps
            acc = float(np.clip(0.1 + (0.6 + 0.2 * seed) * progress + rng.normal(0, 0.05), 0, 1))
            metrics = {
                "train/reward_mean": 2 * acc - 1,
                "train/accuracy": acc,
                "train/entropy": 0.7 * math.exp(-progress * (1 + 2 * seed)),
                "train/response_length_mean": 80 + 40 * progress + rng.normal(0, 3),
                "train/response_length_max": 160 + 40 * progress,
                "train/truncated_frac": 0.05 * progress,
                "train/clip_frac_low": 0.002 + 0.001 * rng.random(),
                "train/clip_frac_high": 0.004 + 0.002 * rng.random(),
                "train/informative_group_frac": 0.8 - 0.3 * progress,
                "train/generation_rounds": int(rng.integers(1, 3)),
                "train/samples_generated": 64 * int(rng.integers(1, 3)),
                "train/sampling_exhausted": float(step % 11 == 10),
                "sampling/rate_estimate": 0.8 - 0.3 * progress,
                "sampling/oversample_factor": 1.3 / (0.8 - 0.3 * progress),
                "sampling/rejected_too_hard": float(rng.integers(0, 4)),
                "sampling/rejected_too_easy": float(rng.integers(0, 6)),
                "sampling/rejected_low_reward_std": 0.0,
                "sampling/surplus_carried": float(rng.integers(0, 5)),
                "sampling/surplus_age_mean": float(rng.integers(0, 2)),
                "sampling/surplus_dropped_age": float(step % 13 == 12),
                "sampling/prompts_retired": float(step // 4),
                "rollout/logp_abs_diff": 0.01 + 0.002 * rng.random(),
                "rollout/kl": 1e-4 * (1 + rng.random()),
                "rollout/is_weight_max": 1.5 + rng.random(),
                "rollout/ess_frac": 0.98 + 0.01 * rng.random(),
                "rollout/masked_frac": 0.001 * rng.random(),
                "rollout/sync_logp_abs_diff": 2e-7 * (1 + rng.random()),
                "rollout/turns_mean": 1.5 + rng.random(),
                "rollout/tool_calls_mean": 0.5 + rng.random(),
                "rollout/tool_errors/parse_error": float(rng.integers(0, 3)),
                "rollout/environment_token_frac": 0.2 + 0.1 * rng.random(),
                "rollout/model_tokens_per_turn": 8 + rng.random(),
            }
            if with_diag:
                for side, centre in (("high", 0.1 + 0.05 * seed), ("low", 0.6)):
                    metrics |= {
                        f"diag/clip_{side}_old_prob_mean": centre * 1.1,
                        f"diag/clip_{side}_old_prob_p10": centre * 0.4,
                        f"diag/clip_{side}_old_prob_p50": centre,
                        f"diag/clip_{side}_old_prob_p90": min(1.0, centre * 2),
                    }
                if step == 7:  # no token clipped at the high side this step
                    metrics |= {
                        f"diag/clip_high_old_prob_{q}": float("nan")
                        for q in ("mean", "p10", "p50", "p90")
                    }
            sink.log(metrics, step)
            if step % 5 == 0 or step == steps - 1:
                sink.log({"eval/accuracy": acc * 0.9}, step)


def _assert_valid_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    pixels = image[::3, ::3, :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 1, f"{path} is a single flat colour"
    return image


def _has_colour(image: np.ndarray, hex_colour: str, tol: float = 0.03) -> bool:
    target = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(image[..., :3] - target) < tol).all(axis=-1).any())


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    runs = [tmp_path / "runs" / "dapo", tmp_path / "runs" / "grpo"]
    for seed, run in enumerate(runs):
        _write_run(run, seed)
    return runs


def test_plot_runs_writes_all_figures(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "plots"
    written = plot_runs(two_runs, out)
    assert [p.name for p in written] == list(FIGURE_NAMES)
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURE_NAMES)
    for path in written:
        image = _assert_valid_png(path)
        # Both runs are drawn, in the first two colours of the default cycle.
        assert _has_colour(image, "#1f77b4") and _has_colour(image, "#ff7f0e"), path.name


def test_plot_runs_smoothing_and_names(two_runs: list[Path], tmp_path: Path) -> None:
    written = plot_runs(two_runs, tmp_path / "smooth", names=["DAPO", "GRPO"], smooth=0.8)
    assert len(written) == len(FIGURE_NAMES)
    for path in written:
        _assert_valid_png(path)
    with pytest.raises(ValueError, match="smooth"):
        plot_runs(two_runs, tmp_path / "bad", smooth=1.0)
    with pytest.raises(ValueError, match="2 runs"):
        plot_runs(two_runs, tmp_path / "bad", names=["only-one"])


def test_metric_missing_in_all_runs_does_not_crash(tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    with JsonlSink(runs[0]) as sink:
        for step in range(10):
            sink.log({"train/reward_mean": step / 10, "train/entropy": float("nan")}, step)
    with JsonlSink(runs[1]) as sink:  # a run that logged nothing at all
        pass
    written = plot_runs(runs, tmp_path / "plots")
    # Only the reward panel has data; figures with no panel at all are not written, and an
    # all-NaN metric counts as absent.
    assert [p.name for p in written] == ["accuracy.png"]
    _assert_valid_png(written[0])
    assert not (tmp_path / "plots" / "entropy.png").exists()


def test_partial_diagnostics_still_plot(tmp_path: Path) -> None:
    # One run logs diagnostics, the other (e.g. an older trainer) does not; a run that has
    # only the mean of a side still gets a line.
    _write_run(tmp_path / "with", seed=0, steps=12)
    with JsonlSink(tmp_path / "without") as sink:
        for step in range(12):
            sink.log({"diag/clip_low_old_prob_mean": 0.5, "train/entropy": 0.3}, step)
    written = plot_runs([tmp_path / "with", tmp_path / "without"], tmp_path / "plots")
    assert "clipped_token_probs.png" in [p.name for p in written]
    for path in written:
        _assert_valid_png(path)


def test_load_series_resume_and_nulls(tmp_path: Path) -> None:
    with JsonlSink(tmp_path) as sink:
        for step in range(4):
            sink.log({"x": float(step), "y": float("nan") if step == 1 else 1.0}, step)
    with JsonlSink(tmp_path) as sink:  # resumed from a checkpoint at step 2
        sink.log({"x": 20.0}, 2)
        sink.log({"x": 30.0}, 3)
    series = load_series(tmp_path)
    steps, values = series["x"]
    assert steps.tolist() == [0, 1, 2, 3]
    assert values.tolist() == [0.0, 1.0, 20.0, 30.0]
    assert series["y"][0].tolist() == [0, 2, 3]


def test_plot_runs_missing_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_runs([tmp_path / "empty"], tmp_path / "plots")


def test_summary_table(two_runs: list[Path], tmp_path: Path) -> None:
    table = summary_table(two_runs)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "dapo", "grpo"]
    assert set(lines[1]) == {"-", " "}
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["last step"] == ["29", "29"]
    assert all(len(row) == 3 for row in cells)

    for run, column in zip(two_runs, (0, 1), strict=True):
        series = load_series(run)
        final_eval = series["eval/accuracy"][1][-1]
        assert float(rows["eval/accuracy"][column]) == pytest.approx(final_eval, rel=1e-3)
        total = int(series["train/samples_generated"][1].sum())
        assert rows["train/samples_generated (total)"][column] == str(total)

    # A run without some metric shows "-".
    with JsonlSink(tmp_path / "tiny") as sink:
        sink.log({"train/reward_mean": 0.5}, 0)
    table = summary_table([two_runs[0], tmp_path / "tiny"], names=["full", "tiny"])
    entropy_row = next(line for line in table.splitlines() if line.startswith("train/entropy"))
    assert entropy_row.split()[-1] == "-"


def test_duplicate_folder_names_are_told_apart(tmp_path: Path) -> None:
    runs = [tmp_path / "ablation_a" / "seed0", tmp_path / "ablation_b" / "seed0"]
    for run in runs:
        with JsonlSink(run) as sink:
            sink.log({"train/reward_mean": 0.1}, 0)
    header = summary_table(runs).splitlines()[0].split()
    assert header == ["metric", "ablation_a/seed0", "ablation_b/seed0"]


def test_plots_do_not_touch_pyplot_state(two_runs: list[Path], tmp_path: Path) -> None:
    """Plotting from a library must not switch the user's backend or leave figures open."""
    code = textwrap.dedent(
        f"""
        import sys
        from dapo_rl.telemetry import plot_runs
        plot_runs({[str(p) for p in two_runs]!r}, {str(tmp_path / "p")!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()


def test_trim_metrics_keeps_the_lines_up_to_the_checkpoint_and_returns_them(tmp_path: Path) -> None:
    from dapo_rl.training.run_folder import trim_metrics

    rows = [{"step": 0, "eval/accuracy": 0.2}, {"step": 1, "train/loss": 1.0}, {"step": 2, "eval/accuracy": 0.5},
            {"step": 3, "train/loss": 0.5}, {"step": 4, "eval/accuracy": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = trim_metrics(tmp_path, 3)
    assert kept == rows[:4]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:4]
    # What a resumed run's progress bar shows: the last evaluation logged before the checkpoint.
    assert next(r["eval/accuracy"] for r in reversed(kept) if "eval/accuracy" in r) == 0.5
    assert trim_metrics(tmp_path / "missing", 3) == []
