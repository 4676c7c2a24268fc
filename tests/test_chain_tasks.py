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

