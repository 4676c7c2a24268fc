"""Dynamic sampling that adapts and never kills a run (issue 20): the sampler's arithmetic by
hand (round sizing, the age bound, the band-pass edges, the spread criterion), the prompt
stream's difficulty memory, and the never-abort path of a real training run."""

from __future__ import annotations


import pytest
import torch

from dapo_rl.algorithm import GROUP_CRITERIA, DynamicSampler, DynamicSamplingExhausted, GroupFilter
from dapo_rl.cli import main
from dapo_rl.data.stream import PromptStream
from dapo_rl.telemetry import read_metrics


def _round(labels: list[list[int]], start: int = 0):
    groups = [f"g{start + i}" for i in range(len(labels))]
    return groups, torch.tensor(labels, dtype=torch.bool)


def _accepting(accepted: int, total: int, start: int = 0):
    """A round of ``total`` groups of two samples, the first ``accepted`` of them mixed."""
    return _round([[1, 0]] * accepted + [[0, 0]] * (total - accepted), start)


# ----------------------------------------------------------------------------- round sizing


def test_round_size_follows_the_estimated_rate_by_hand():
    sampler = DynamicSampler(groups_per_step=10, oversample_margin=1.3)
    sampler.start_step(0)
    # p̂ = 1 before any round: ceil(1.3 · 10 / 1) = 13 (not 14: 1.3 · 10 is 13.000000000000002).
    assert sampler.rate_estimate == 1.0 and sampler.round_size() == 13
    sampler.add(*_accepting(5, 13))
    # I = 5, N = 13: p̂ = 5/13; 5 missing → ceil(1.3 · 5 · 13 / 5) = ceil(16.9) = 17.
    assert sampler.rate_estimate == pytest.approx(5 / 13)
    assert sampler.round_size() == 17
    sampler.add(*_accepting(8, 17, 13))
    # I = 0.5 · 5 + 8 = 10.5, N = 0.5 · 13 + 17 = 23.5.
    assert sampler.rate_estimate == pytest.approx(10.5 / 23.5)
    assert not sampler.needs_more()
    batch = sampler.take()
    assert len(batch.groups) == 10 and batch.rounds == 2 and batch.groups_generated == 30
    assert (batch.missing, batch.carried_out, batch.rate_estimate) == (10, 3, 1.0)
    assert batch.oversample_factor == pytest.approx(30 / 10)
    sampler.start_step(1)
    # 3 carried, 7 missing: ceil(1.3 · 7 · 23.5 / 10.5) = ceil(20.366...) = 21.
    assert sampler.round_size() == 21
    assert sampler.take().rate_estimate == pytest.approx(10.5 / 23.5)  # the p̂ the step started with


def test_round_size_is_bounded_and_exact_without_filtering():
    capped = DynamicSampler(groups_per_step=10, max_prompts_per_round=20)
    capped.start_step(0)
    capped.add(*_accepting(1, 10))  # p̂ = 0.1: ceil(1.3 · 9 / 0.1) = 117 → the bound
    assert capped.round_size() == 20
    none = DynamicSampler(groups_per_step=4)
    none.start_step(0)
    none.add(*_accepting(0, 6))  # p̂ = 0: as many as a round may hold, 4 × B by default
    assert none.round_size() == 16
    plain = DynamicSampler(groups_per_step=4, enabled=False, oversample_margin=2.0)
    plain.start_step(0)
    assert plain.round_size() == 4  # every group is accepted: no reason to over-sample
    margin_one = DynamicSampler(groups_per_step=4, oversample_margin=1.0)
    margin_one.start_step(0)
    margin_one.add(*_accepting(2, 4))  # p̂ = 1/2, 2 missing: exactly 2 / (1/2) = 4
    assert margin_one.round_size() == 4


# ----------------------------------------------------------------------------- surplus and its age


def test_surplus_is_versioned_trained_oldest_first_and_dropped_past_the_age_bound():
    sampler = DynamicSampler(groups_per_step=1, max_surplus_age=1)
    sampler.start_step(0)
    sampler.add(*_accepting(3, 3))
    batch = sampler.take()
    assert batch.groups == ["g0"] and batch.ages == [0] and batch.carried_out == 2
    sampler.start_step(1)  # one update later: age 1 <= 1, kept, and trained before anything new
    assert not sampler.needs_more()
    batch = sampler.take()
    assert batch.groups == ["g1"] and batch.ages == [1]
    assert (batch.carried_in, batch.carried_used, batch.carried_out, batch.rounds) == (2, 1, 1, 0)
    sampler.start_step(3)  # g2 was sampled 3 updates ago: dropped and counted
    assert sampler.pooled == 0 and sampler.needs_more()
    sampler.add(*_accepting(1, 1, 5))
    batch = sampler.take()
    assert batch.groups == ["g5"] and batch.dropped_by_age == 1 and batch.carried_in == 0


def test_no_update_means_no_ageing_and_drop_policy_counts_its_discards():
    sampler = DynamicSampler(groups_per_step=1, max_surplus_age=0)
    sampler.start_step(4)
    sampler.add(*_accepting(2, 2))
    sampler.take()
    sampler.start_step(4)  # the step before applied no update (e.g. nothing to train on)
    assert sampler.take().groups == ["g1"]
    dropping = DynamicSampler(groups_per_step=1, surplus="drop")
    dropping.start_step(0)
    dropping.add(*_accepting(3, 3))
    batch = dropping.take()
    assert batch.dropped_surplus == 2 and dropping.pooled == 0


# ----------------------------------------------------------------------------- criteria


def test_accuracy_band_pass_edges():
    criterion = GROUP_CRITERIA.get("accuracy")
    k = torch.arange(11)  # k correct of G = 10
    correct = torch.arange(10).expand(11, 10) < k[:, None]
    band = criterion(correct, correct.double(), GroupFilter((0.3, 0.7)))
    # 3/10 == 0.3 and 7/10 == 0.7 exactly in float64: both bounds are excluded.
    assert band["too_hard"].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert band["too_easy"].nonzero().flatten().tolist() == [7, 8, 9, 10]
    dapo = criterion(correct, correct.double(), GroupFilter())
    kept = ~(dapo["too_hard"] | dapo["too_easy"])
    assert kept.nonzero().flatten().tolist() == list(range(1, 10))  # 0 < k < G


def test_sampler_counts_each_rejection_reason():
    sampler = DynamicSampler(groups_per_step=3, accuracy_range=(0.25, 1.0))
    sampler.start_step(0)
    # G = 4: accuracies 0, 1/4, 2/4, 3/4, 1 → lo = 1/4 rejects the first two, hi = 1 the last.
    accepted = sampler.add(*_round([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert accepted == 2
    batch = sampler.take()
    assert batch.groups == ["g2", "g3"] and batch.rejected == {"too_hard": 2, "too_easy": 1}


def test_reward_std_criterion_by_hand():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.5]])
    criterion = GROUP_CRITERIA.get("reward_std")
    correct = torch.zeros(4, 4, dtype=torch.bool)
    # Unbiased stds: 0, 0 (equal rewards, exactly), sqrt(1/3) = 0.577, sqrt(0.1875 / 3) = 0.25.
    assert criterion(correct, rewards, GroupFilter())["low_reward_std"].tolist() == [True, True, False, False]
    assert criterion(correct, rewards, GroupFilter(min_reward_std=0.25))["low_reward_std"].tolist() == [True, True, False, True]
    sampler = DynamicSampler(groups_per_step=1, criterion="reward_std", min_reward_std=0.5)
    sampler.start_step(0)
    assert sampler.add([f"g{i}" for i in range(4)], correct, rewards) == 1
    assert sampler.take().rejected == {"low_reward_std": 3}


# ----------------------------------------------------------------------------- never abort


def test_default_trains_on_what_was_found_and_counts_it():
    sampler = DynamicSampler(groups_per_step=2, max_rounds=1)
    for version in range(2):
        sampler.start_step(version)
        sampler.add(*_round([[1, 1], [0, 0]]))  # nothing informative
        assert not sampler.needs_more()
        batch = sampler.take()
        assert batch.groups == [] and batch.exhausted
    assert sampler.exhausted_total == 2
    strict = DynamicSampler(groups_per_step=2, max_rounds=1, on_exhausted="error")
    strict.start_step(0)
    strict.add(*_round([[1, 0]]))
    with pytest.raises(DynamicSamplingExhausted, match="on_exhausted=train"):
        strict.needs_more()


def test_state_round_trip_keeps_versions_rate_and_counts():
    sampler = DynamicSampler(groups_per_step=1, max_rounds=1, max_surplus_age=2)
    sampler.start_step(5)
    sampler.add(*_accepting(0, 2))
    assert sampler.take().exhausted
    sampler.start_step(6)
    sampler.add(*_accepting(3, 4))
    sampler.take()
    restored = DynamicSampler(groups_per_step=1, max_rounds=1, max_surplus_age=2)
    restored.load_state_dict(sampler.state_dict())
    # I = 0.5 · 0 + 3, N = 0.5 · 2 + 4.
    assert restored.pooled == 2 and restored.rate_estimate == sampler.rate_estimate == 3 / 5
    assert restored.exhausted_total == 1
    restored.start_step(8)
    assert restored.take().ages == [2]
    legacy = DynamicSampler(groups_per_step=1)
    legacy.load_state_dict({"pool": ["old"]})  # a checkpoint from before versions: taken as fresh
    legacy.start_step(40)
    assert legacy.take().ages == [0] and legacy.rate_estimate == 1.0


@pytest.mark.parametrize("bad", [
    dict(accuracy_range=(0.5, 0.5)), dict(accuracy_range=(-0.1, 1.0)), dict(min_reward_std=-1.0),
    dict(max_surplus_age=-1), dict(max_prompts_per_round=3), dict(oversample_margin=0.9), dict(criterion="nope"),
])
def test_sampler_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        DynamicSampler(groups_per_step=4, **bad)


# ----------------------------------------------------------------------------- prompt stream


def test_stream_retires_after_k_consecutive_all_correct_visits():
    stream = PromptStream(list("abcd"), seed=0, retire_solved_after=2)
    stream.record(0, [True, True])
    stream.record(0, [True, False])  # a miss resets the count
    stream.record(0, [True, True])
    assert stream.retired == 0
    stream.record(0, [True, True])
    stream.record(1, [True, True])
    stream.record(1, [True, True])
    assert stream.retired == 2
    served = stream.take(20)
    assert set(served) == {"c", "d"} and len(served) == 20


def test_stream_unsolved_weight_zero_skips_visited_unsolved_prompts():
    stream = PromptStream(list(range(6)), seed=3, unsolved_weight=0.0)
    first = stream.take_indices(6)
    assert sorted(first) == list(range(6))
    for index in first:
        stream.record(index, [index % 2 == 0, False])  # odd prompts never solved
    assert stream.never_solved == 3
    assert sorted(stream.take_indices(3)) == [0, 2, 4]


def test_stream_never_runs_dry_and_resumes_exactly():
    stream = PromptStream(list(range(3)), seed=1, retire_solved_after=1)
    for index in range(3):
        stream.record(index, [True])
    assert stream.retired == 3 and len(stream.take(5)) == 5  # all retired: served anyway
    live = PromptStream(list(range(10)), seed=2, retire_solved_after=1, unsolved_weight=0.5)
    for _ in range(6):
        for index in live.take_indices(4):
            live.record(index, [index % 3 == 0, index % 3 != 2])
    copy = PromptStream(list(range(10)), seed=2, retire_solved_after=1, unsolved_weight=0.5)
    copy.load_state_dict(live.state_dict())
    assert live.retired == copy.retired > 0
    for _ in range(5):
        indices = live.take_indices(3)
        assert copy.take_indices(3) == indices
        for index in indices:
            live.record(index, [index % 2 == 0])
            copy.record(index, [index % 2 == 0])


# ----------------------------------------------------------------------------- a real run


FAST = ["steps=3", "prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16",
        "data.eval=null", "data.builtin_train_size=256", "logging.progress=false"]


def test_round_budget_of_one_on_a_mostly_uniform_task_completes_every_step(tmp_path, quickstart_cache, monkeypatch, capfd):
    # Reward call i belongs to group i // 4; only every 16th group is mixed, the rest all wrong.
    (tmp_path / "sparse_reward_mod.py").write_text("""
import itertools
_calls = itertools.count()

def reward(response, ground_truth, metadata):
    i = next(_calls)
    return (i // 4) % 16 == 0 and i % 2 == 0
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    rc = main(["train", *FAST, f"quickstart.cache_dir={quickstart_cache}", f"output_dir={out}",
               "reward.function=sparse_reward_mod:reward", "dynamic_sampling.max_rounds=1"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/sampling_exhausted"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["train/sampling_exhausted_total"] for r in rows] == [1.0, 2.0, 3.0]
    assert captured.out.count("dynamic sampling found") == 1  # said once per run
    # Step 1: p̂ = 1 asks ceil(1.3 · 4) = 6 prompts, of which group 0 is mixed. Step 2: p̂ = 1/6
    # asks ceil(1.3 · 4 · 6) = 32, bounded by 4 × B = 16; groups 6..21 hold group 16.
    assert [r["train/samples_generated"] for r in rows[:2]] == [24.0, 64.0]
    assert [r["train/batch_groups"] for r in rows[:2]] == [1.0, 1.0]
    assert rows[0]["sampling/rejected_too_hard"] == 5.0 and rows[0]["sampling/rate_estimate"] == 1.0
    assert rows[1]["sampling/rate_estimate"] == pytest.approx(1 / 6)
    assert all(r["train/updates"] == 1.0 for r in rows)
    assert (out / "final" / "model.safetensors").is_file()
