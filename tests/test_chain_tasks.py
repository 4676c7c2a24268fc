"""The built-in chain tasks (``builtin:chain`` and ``builtin:chain-long``): their problems, data
splits, reward, built-in models and the cache keys of those models."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dapo_rl.config import QuickstartConfig
from dapo_rl.data.encoding import DatasetError, PromptSource, load_prompts
from dapo_rl.data.datasets import DatasetSpec
from dapo_rl.data.synthetic import (
    CHAIN,
    CHAIN_LONG,
    CHAIN_TASKS,
    VOCAB,
    builtin_splits,
    sample_problem,
    solution,
)
from dapo_rl.data.builtin_tasks import builtin_task
from dapo_rl.models.quickstart import builtin_model_task, quickstart_key
from dapo_rl.models.tiny import build_char_tokenizer
from dapo_rl.rewards.chain import chain_reward
from dapo_rl.rewards.registry import resolve_reward_fn


@pytest.mark.parametrize("task", list(CHAIN_TASKS.values()), ids=lambda t: t.name)
def test_problems_cover_the_task_range_with_a_fixed_prompt_width(task):
    rng = random.Random(0)
    problems = [sample_problem(rng, task) for _ in range(4000)]
    terms = Counter(len(p.digits) for p in problems)
    assert set(terms) == set(range(task.min_terms, task.max_terms + 1))
    assert min(terms.values()) > 0.6 * 4000 / len(terms)  # uniform over the range
    for p in problems[:200]:
        assert len(p.prompt) == task.max_terms + 1 and p.prompt.endswith("=")
        assert p.answer == str(sum(p.digits) % 10)
        # The shortest correct answer: one running sum per digit, then "#" and the answer.
        assert solution(p) == "".join(str(sum(p.digits[: i + 1]) % 10) for i in range(len(p.digits))) + f"#{p.answer}"
        assert chain_reward(solution(p), p.answer, {})


def test_the_quickstart_task_draws_the_same_problems_as_before_the_long_task():
    # builtin:chain's problems (and so the quickstart's warm-up and data) must not move: 2-6 digits,
    # six slots, one randint then the digits from the same generator.
    rng = random.Random(5)
    terms = rng.randint(2, 6)
    digits = tuple(rng.randrange(10) for _ in range(terms))
    assert sample_problem(random.Random(5)).digits == digits
    assert sample_problem(random.Random(5), CHAIN).prompt == "".join(map(str, digits)).ljust(6, ".") + "="


def test_builtin_long_data_loads_disjoint_splits_of_wider_prompts():
    def prompts(held_out):
        source = PromptSource(dataset=DatasetSpec(path="builtin:chain-long"), held_out=held_out,
                              builtin_train_size=500, builtin_eval_size=64)
        loaded, skipped = load_prompts(source, tokenizer=build_char_tokenizer(VOCAB))
        assert not skipped
        return loaded

    held_out, train = prompts(True), prompts(False)
    assert (len(held_out), len(train)) == (64, 500)
    assert {len(p.text) for p in held_out + train} == {CHAIN_LONG.max_terms + 1}
    assert not {p.text for p in held_out} & {p.text for p in train}
    assert builtin_splits(500, 64, task=CHAIN_LONG)[1][0].prompt == held_out[0].text


def test_unknown_builtin_names_are_refused_with_the_known_ones():
    with pytest.raises(DatasetError, match="builtin:chain, builtin:chain-long, builtin:calculator"):
        load_prompts(PromptSource(dataset=DatasetSpec(path="builtin:chains")), tokenizer=build_char_tokenizer(VOCAB))
    with pytest.raises(ValueError, match="builtin:chain-tiny, builtin:chain-long-tiny, builtin:calculator-tiny"):
        builtin_model_task("builtin:chain-long")  # a dataset name, not a model
    assert builtin_model_task("builtin:chain-long-tiny") is CHAIN_LONG
    assert builtin_task("builtin:chain") is CHAIN


def test_auto_reward_is_the_chain_reward_for_every_chain_dataset():
    for name in CHAIN_TASKS:
        assert resolve_reward_fn("auto", data=f"builtin:{name}").name == "chain"
    with pytest.raises(ValueError, match="unknown built-in task 'builtin:chains'"):
        resolve_reward_fn("auto", data="builtin:chains")
    assert resolve_reward_fn("auto", data="problems.jsonl").name == "math"


def test_model_cache_keys_keep_the_quickstart_model_and_separate_the_tasks():
    default = QuickstartConfig()
    # The quickstart model's key predates the long task; caches built before it stay valid.
    assert quickstart_key(default, 0) == quickstart_key(QuickstartConfig(warmup_steps=CHAIN.warmup_steps), 0) == "0452e0d5c0aa"
    long_key = quickstart_key(default, 0, CHAIN_LONG)
    assert long_key != quickstart_key(default, 0)
    assert long_key == quickstart_key(QuickstartConfig(warmup_steps=CHAIN_LONG.warmup_steps), 0, CHAIN_LONG)



def test_a_warm_up_below_its_floor_trains_on_then_refuses(tmp_path):
    """A task with a floor on greedy accuracy gets extra warm-up cycles while it is below, and a
    clear error if it never gets there; a floor it meets is recorded with no extra cycle."""
    import dataclasses
    import json

    from dapo_rl.models.quickstart import prepare_quickstart_model

    settings = QuickstartConfig(cache_dir=str(tmp_path))
    impossible = dataclasses.replace(CHAIN_LONG, warmup_steps=20, min_greedy_accuracy=1.01)
    with pytest.raises(RuntimeError, match="after 4 extra warm-up cycles, below its floor 1.01"):
        prepare_quickstart_model(settings, progress=False, task=impossible)
    met = prepare_quickstart_model(settings, progress=False, task=dataclasses.replace(impossible, min_greedy_accuracy=0.0))
    recorded = json.loads((met / "quickstart.json").read_text())
    assert recorded["extra_cycles"] == 0 and 0.0 <= recorded["greedy_accuracy"] <= 1.0
    # A chosen warm-up length is taken as given: no check.
    chosen = prepare_quickstart_model(QuickstartConfig(cache_dir=str(tmp_path), warmup_steps=5), progress=False, task=impossible)
    assert "greedy_accuracy" not in json.loads((chosen / "quickstart.json").read_text())


@pytest.mark.slow
def test_the_ablation_model_warms_up_to_its_recorded_start_from_an_empty_cache(tmp_path, monkeypatch):
    """builtin:chain-long-tiny, built as a new user's first run builds it (empty cache, default
    threads), has learned the running sums (greedy) and starts RL in the recorded band (sampled)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_rl.models.quickstart import greedy_accuracy, prepare_quickstart_model

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path))
    folder = prepare_quickstart_model(QuickstartConfig(), progress=False, task=CHAIN_LONG)
    assert json.loads((folder / "quickstart.json").read_text())["greedy_accuracy"] >= CHAIN_LONG.min_greedy_accuracy
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    assert greedy_accuracy(model, tokenizer, CHAIN_LONG) >= 0.5
    _, held_out = CHAIN_LONG.splits(1, 256)
    ids = torch.tensor([tokenizer(e.prompt)["input_ids"] for e in held_out])
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=16, do_sample=True, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    sampled = sum(chain_reward(t, e.answer, {}) for t, e in zip(texts, held_out)) / len(held_out)
    assert 0.2 <= sampled <= 0.5  # room for RL, and well above chance (0.1)
