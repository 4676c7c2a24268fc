"""Tests for the ablation ladder: the rung → config mapping, and a two-rung, one-seed smoke run of
``dapo ablate`` that writes its table and plot and skips finished runs when called again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dapo_rl.cli import main
from dapo_rl.config import ConfigError, QuickstartConfig
from dapo_rl.config import to_yaml
from dapo_rl.experiments.ablation import (
    ABLATION_DEFAULTS,
    RUNG_KEYS,
    AblationPlan,
    RUNGS,
    run_status,
    rung_config,
    select_rungs,
)
from dapo_rl.experiments.ablation_report import AblationReport, RunSummary, paired_effect, steps_to_target_or_budget
from dapo_rl.models.quickstart import prepare_quickstart_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The ladder exactly as the issue lists it; each row adds one technique to the row above.
EXPECTED = {
    "grpo": dict(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean", filter=False, soft=False, ds=False),
    "overlong_filter": dict(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean", filter=True, soft=False, ds=False),
    "clip_higher": dict(eps_low=0.2, eps_high=0.28, agg="seq-mean-token-mean", filter=True, soft=False, ds=False),
    "soft_punishment": dict(eps_low=0.2, eps_high=0.28, agg="seq-mean-token-mean", filter=True, soft=True, ds=False),
    "token_loss": dict(eps_low=0.2, eps_high=0.28, agg="token-mean", filter=True, soft=True, ds=False),
    "dapo": dict(eps_low=0.2, eps_high=0.28, agg="token-mean", filter=True, soft=True, ds=True),
}


def test_rungs_are_the_six_of_the_issue_in_order():
    assert [r.name for r in RUNGS] == list(EXPECTED)
    for rung in RUNGS:
        assert set(rung.settings) == set(RUNG_KEYS)


@pytest.mark.parametrize("rung", RUNGS, ids=lambda r: r.name)
def test_rung_config_sets_exactly_the_rung(rung, tmp_path):
    config = rung_config(rung, seed=2, steps=7, out=tmp_path, overrides=["eval.interval=3"])
    want = EXPECTED[rung.name]
    got = dict(eps_low=config.clip.eps_low, eps_high=config.clip.eps_high, agg=config.loss.agg_mode,
               filter=config.overlong.filter, soft=config.overlong.soft_punishment, ds=config.dynamic_sampling.enabled)
    assert got == want
    assert (config.seed, config.steps, Path(config.output_dir)) == (2, 7, tmp_path / rung.name / "seed2")
    assert config.eval.interval == 3  # pass-through override applied
    # The shared ablation settings hold for every rung, so all rungs do the same number of updates.
    assert config.prompts_per_step == ABLATION_DEFAULTS["prompts_per_step"]
    assert config.mini_batch_size == ABLATION_DEFAULTS["mini_batch_size"]
    assert config.rollout.max_response_length == ABLATION_DEFAULTS["rollout.max_response_length"]


def test_a_base_config_file_replaces_the_built_in_task_settings(tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-arithmetic.yaml"
    config = rung_config(RUNGS[0], seed=1, steps=9, out=tmp_path, overrides=["optim.lr=3e-5"], base_config=recipe)
    # The recipe's own settings, not ABLATION_DEFAULTS (the built-in task's).
    assert (config.rollout.max_response_length, config.prompts_per_step, config.reward.function) == (48, 4, "last_number")
    assert config.optim.lr == 3e-5  # overrides on top of the file
    assert (config.clip.eps_high, config.dynamic_sampling.enabled) == (0.2, False)  # the rung on top of both
    assert (config.seed, config.steps, Path(config.output_dir)) == (1, 9, tmp_path / "grpo" / "seed1")


@pytest.mark.parametrize("override", ["clip.eps_high=0.3", "dynamic_sampling.enabled=true", "seed=3", "steps=5"])
def test_overrides_of_rung_switches_and_run_keys_are_refused(override, tmp_path):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        rung_config(RUNGS[0], 0, 1, tmp_path, [override])


def test_select_rungs_by_number_or_name_in_ladder_order():
    assert [r.name for r in select_rungs("6,1")] == ["grpo", "dapo"]
    assert [r.name for r in select_rungs("clip_higher, 2")] == ["overlong_filter", "clip_higher"]
    assert len(select_rungs(None)) == 6
    with pytest.raises(ConfigError, match="unknown rung"):
        select_rungs("7")


def test_run_status_new_partial_done_and_foreign(tmp_path):
    config = rung_config(RUNGS[0], 0, 3, tmp_path)
    run_dir = Path(config.output_dir)
    assert run_status(config) == "new"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    assert run_status(config) == "partial"  # started, never finished: resumed, not skipped
    (run_dir / "metrics.jsonl").write_text('{"step": 3}\n')
    (run_dir / "summary.json").write_text(json.dumps({"steps": 3, "accuracy_after": 0.5}))
    assert run_status(config) == "done"
    longer = rung_config(RUNGS[0], 0, 5, tmp_path)
    with pytest.raises(ConfigError, match="another configuration"):
        run_status(longer)  # a folder holding another run is never overwritten


# ----------------------------------------------------------------------------- smoke run

TINY_WARMUP = {"warmup_steps": 20, "warmup_batch": 16}


@pytest.fixture(scope="session")
def tiny_quickstart_cache(tmp_path_factory) -> str:
    """A barely warmed-up built-in model, built once per session (a few seconds)."""
    cache = tmp_path_factory.mktemp("ablation-cache")
    prepare_quickstart_model(QuickstartConfig(cache_dir=str(cache), **TINY_WARMUP), seed=0, progress=False)
    return str(cache)


def _smoke_args(out: Path, cache: str) -> list[str]:
    return [
        "ablate", "--rungs", "grpo,dapo", "--seeds", "1", "--steps", "2", "--out", str(out),
        f"quickstart.cache_dir={cache}", *(f"quickstart.{k}={v}" for k, v in TINY_WARMUP.items()),
        "prompts_per_step=2", "mini_batch_size=1", "group_size=4", "micro_batch_size=4",
        "rollout.max_response_length=8", "overlong.cache_length=3", "dynamic_sampling.max_rounds=2",
        "data.builtin_train_size=64", "data.builtin_eval_size=8", "eval.interval=0", "--pass-at-k", "4",
    ]


def test_ablate_smoke_writes_table_and_plot_and_skips_finished_runs(tmp_path, tiny_quickstart_cache, capsys, monkeypatch):
    out = tmp_path / "ablation"
    assert main(_smoke_args(out, tiny_quickstart_cache)) == 0
    printed = capsys.readouterr().out

    table = (out / "ablation.md").read_text()
    for label in ("naive GRPO", "+ dynamic sampling (DAPO)"):
        assert label in table and label in printed
    assert "+ overlong filtering" not in table  # only the rungs asked for
    png = (out / "ablation.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    data = json.loads((out / "ablation.json").read_text())
    assert set(data["runs"]) == {"grpo", "dapo"} and not data["failures"]
    for rung in ("grpo", "dapo"):
        (run,) = data["runs"][rung]
        assert run["steps"] == 2 and run["accuracy_start"] is not None and run["accuracy_final"] is not None
        assert (out / rung / "seed0" / "metrics.jsonl").is_file()
    # Naive GRPO generates exactly one batch per step: 2 steps × 2 prompts × 4 samples.
    assert data["runs"]["grpo"][0]["samples_generated"] == 16
    # pass@1..4 of the start policy and of both final policies, in the table and the JSON.
    for rung in ("grpo", "dapo"):
        passed = data["runs"][rung][0]["pass_at_k"]
        assert set(passed) == {"1", "2", "4"} and 0 <= passed["1"] <= passed["2"] <= passed["4"] <= 1
        assert json.loads((out / rung / "seed0" / "pass_at_k.json").read_text())["k"] == 4
    assert set(data["start_pass_at_k"]) == {"1", "2", "4"}
    assert "| start (before RL) |" in table and "pass@4" in table
    # One paired effect: DAPO against naive GRPO (adjacent here), with a single seed (no interval).
    (effect,) = data["effects"]
    assert (effect["treatment"], effect["control"], effect["seeds"]) == ("+ dynamic sampling (DAPO)", "naive GRPO", [0])
    assert effect["low"] == effect["high"] == pytest.approx(effect["mean"])

    # A second call finds both runs finished and trains nothing.
    mtime = (out / "grpo" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
    assert main(_smoke_args(out, tiny_quickstart_cache)) == 0
    assert capsys.readouterr().out.count("already finished, skipped") == 2
    assert (out / "grpo" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == mtime

    # The same folder with another setting is refused, not overwritten.
    changed = [a if a != "eval.interval=0" else "eval.interval=1" for a in _smoke_args(out, tiny_quickstart_cache)]
    assert main(changed) == 2
    assert "another configuration" in capsys.readouterr().err

    # A pass@k evaluation that fails is reported and fails the command; the trained runs are kept.
    def broken(*args):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr("dapo_rl.experiments.ablation._pass_at_k_one", broken)
    again = [a if a != "4" else "2" for a in _smoke_args(out, tiny_quickstart_cache)]  # --pass-at-k 2: not yet evaluated
    assert main(again) == 1
    printed = capsys.readouterr().out
    assert printed.count("FAILED (RuntimeError: evaluation broke)") == 3  # the start policy and both runs
    assert "grpo/seed0 pass@2: RuntimeError: evaluation broke" in (out / "ablation.md").read_text()
    assert (out / "grpo" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_overrides_after_options_reach_the_runs(tmp_path, capsys):
    # `dapo ablate CONFIG.yaml --seeds 3 key=value`: argparse alone would refuse the trailing override.
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-arithmetic.yaml"
    assert main(["ablate", str(recipe), "--rungs", "6", "--steps", "1", "--out", str(tmp_path), "stepz=3"]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err


def test_paired_effect_is_the_mean_difference_with_a_student_t_interval():
    # Differences 0.1, 0.2, 0.3: mean 0.2, sample std 0.1; t(0.975, 2 df) = 4.302653 (tables), so the
    # half-width is 4.302653 * 0.1 / sqrt(3) = 0.248414.
    effect = paired_effect("b", "a", {0: 0.6, 1: 0.7, 2: 0.9, 7: 0.5}, {0: 0.5, 1: 0.5, 2: 0.6})
    assert effect.seeds == [0, 1, 2]  # seed 7 has no control run
    assert effect.differences == pytest.approx([0.1, 0.2, 0.3])
    assert effect.mean == pytest.approx(0.2)
    assert (effect.low, effect.high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert not effect.excludes_zero
    tight = paired_effect("b", "a", {0: 0.3, 1: 0.31, 2: 0.29}, {0: 0.1, 1: 0.1, 2: 0.1})
    assert tight.excludes_zero and tight.low > 0
    assert paired_effect("b", "a", {0: 1.0}, {1: 1.0}) is None


def test_steps_to_target_counts_a_seed_that_never_got_there_as_its_whole_run():
    def run(seed, steps_to_target):
        return RunSummary(run_dir="x", seed=seed, steps=60, accuracy_start=0.3, accuracy_final=0.9,
                          steps_to_target=steps_to_target, entropy_final=None, length_final=None, truncated_final=None,
                          informative_frac=None, samples_generated=0.0, updates=0.0, seconds=None)
    assert steps_to_target_or_budget(run(0, 12)) == 12
    assert steps_to_target_or_budget(run(0, None)) == 60
    plan = AblationPlan(select_rungs("grpo,dapo"), [0, 1], 60, Path("unused"), [])
    report = AblationReport(plan, {"grpo": [run(0, 30), run(1, None)], "dapo": [run(0, 10), run(1, 20)]}, {})
    assert report.steps_ratio() == (15.0, 45.0)


def test_steps_to_match_finds_the_first_evaluation_at_the_controls_final_accuracy():
    def run(seed, curve):
        return RunSummary(run_dir="x", seed=seed, steps=curve[-1][0], accuracy_start=curve[0][1], accuracy_final=curve[-1][1],
                          steps_to_target=None, entropy_final=None, length_final=None, truncated_final=None,
                          informative_frac=None, samples_generated=0.0, updates=0.0, seconds=None, eval_curve=curve)
    plan = AblationPlan(select_rungs("grpo,dapo"), [0, 1, 2], 20, Path("unused"), [])
    grpo = [run(0, [(0, 0.3), (10, 0.7), (20, 0.9)]), run(1, [(0, 0.3), (10, 0.8), (20, 0.95)])]
    dapo = [run(0, [(0, 0.3), (10, 0.9), (20, 0.97)]), run(1, [(0, 0.3), (10, 0.9), (20, 0.94)]), run(2, [(0, 0.3), (20, 1.0)])]
    report = AblationReport(plan, {"grpo": grpo, "dapo": dapo}, {})
    assert report.steps_to_match() == [(0, 10, 20), (1, None, 20)]  # seed 2 has no naive run
    assert "10 of 20, never of 20; mean **75%**" in report.markdown()


@pytest.mark.parametrize("args, needle", [
    (["--pass-at-k", "-1"], "--pass-at-k: must be >= 0"),
    (["--jobs", "0"], "--jobs: must be >= 1"),
    (["model.path=builtin:chain-long"], "model.path: unknown built-in model 'builtin:chain-long'"),
])
def test_bad_ablate_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    assert main(["ablate", "--rungs", "1", "--steps", "1", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
