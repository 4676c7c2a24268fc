"""The built-in tasks: the sum of a few digits modulo 10, written out as a chain of running sums.

A correct response writes the running sum after each digit, then the answer after ``#``::

    prompt:   3527..=        (digits right-padded with "." to six slots)
    response: 3807#7

Two variants (:data:`CHAIN_TASKS`), each a dataset name and a built-in model warmed up on it:

- ``builtin:chain`` (2–6 digits; model ``builtin:chain-tiny``): the quickstart's task.
- ``builtin:chain-long`` (2–10 digits; model ``builtin:chain-long-tiny``): the ablation's task.
  Responses run from 4 to 13 tokens before any re-check, and a warm-up policy that errs on each
  running sum solves short problems often and long ones rarely, so one batch mixes groups that are
  all correct, mixed and all wrong (see docs/ablation.md for the measured properties).

Why this task: the answer is verifiable exactly; the reasoning part grows with the number of
terms, so response lengths vary; and the supervised warm-up data (see :func:`warmup_response`)
holds two faults that RL must remove: a wrong running sum with probability ``step_error`` (which
makes the final answer wrong) and useless ``=S`` re-checks before the answer (which make responses
long, sometimes longer than the cap, so that overlong filtering and the soft overlong punishment
have work to do). The prompt has a fixed width so that the digit a step reads always lies the
same number of tokens back: a tiny model learns that with one attention head, in seconds.

The reward (the digit after the last ``#``) is :mod:`dapo_rl.rewards.chain`'s ``chain`` reward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dapo_rl.data.datasets import Example

VOCAB = list("0123456789.=#")


@dataclass(frozen=True)
class ChainTask:
    """One variant of the chain task: how many digits a problem has (uniform in the range).

    The prompt is always ``max_terms`` slots wide, so the digit a step reads lies a fixed number
    of tokens back.
    """

    name: str  # the dataset is builtin:<name>, its warmed-up model builtin:<name>-tiny
    min_terms: int
    max_terms: int
    warmup_steps: int  # supervised warm-up steps of its built-in model (quickstart.warmup_steps=null)
    # The warmed-up model's greedy accuracy must reach this, or it trains on (see
    # dapo_rl.models.quickstart): whether a fixed number of steps finds the procedure depends on
    # float rounding, so on the machine. None: no check (the quickstart's model is unchanged).
    min_greedy_accuracy: float | None = None

    reward = "chain"  # the reward reward.function=auto picks (dapo_rl.rewards.chain)
    max_positions = 128  # the tiny model's context
    vocab = VOCAB
    words = ()  # one token per character, no longer pieces

    def splits(self, train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """:func:`builtin_splits` of this task."""
        return builtin_splits(train_size, eval_size, seed=seed, task=self)

    def warmup_segments(self, rng: random.Random, settings) -> list[tuple[str, bool]]:
        """One warm-up example as ``(text, trained)`` segments: the prompt, then the response
        (:func:`warmup_response` with ``settings.step_error`` / ``settings.recheck``: the
        :class:`~dapo_rl.config.QuickstartConfig`), followed by the end-of-sequence token."""
        problem = sample_problem(rng, self)
        return [(problem.prompt, False), (warmup_response(problem, rng, step_error=settings.step_error, recheck=settings.recheck), True)]


CHAIN = ChainTask("chain", 2, 6, warmup_steps=300)
# A 10-slot prompt reads each digit from further back: the short task's warm-up leaves the model
# guessing, so it warms up for longer, until it has learned the running sums (docs/ablation.md).
# 800 steps found them on one machine and not on another (greedy accuracy 0 at 2 threads here):
# 1600, and a floor that keeps training until the procedure is there.
CHAIN_LONG = ChainTask("chain-long", 2, 10, warmup_steps=1600, min_greedy_accuracy=0.5)
CHAIN_TASKS: dict[str, ChainTask] = {task.name: task for task in (CHAIN, CHAIN_LONG)}
# The quickstart task's bounds, under their historical names.
MIN_TERMS = CHAIN.min_terms
MAX_TERMS = CHAIN.max_terms


@dataclass(frozen=True)
class ChainProblem:
    digits: tuple[int, ...]
    width: int = MAX_TERMS  # prompt slots (the task's max_terms)

    @property
    def prompt(self) -> str:
        """The digits, right-padded with ``.`` to ``width`` slots, then ``=``."""
        return "".join(map(str, self.digits)).ljust(self.width, ".") + "="

    @property
    def answer(self) -> str:
        return str(sum(self.digits) % 10)


def sample_problem(rng: random.Random, task: ChainTask = CHAIN) -> ChainProblem:
    """A problem of ``task`` with a uniformly chosen number of digits."""
    terms = rng.randint(task.min_terms, task.max_terms)
    return ChainProblem(tuple(rng.randrange(10) for _ in range(terms)), width=task.max_terms)


def solution(problem: ChainProblem) -> str:
    """The shortest correct response."""
    return warmup_response(problem, random.Random(0), step_error=0.0, recheck=0.0)


def warmup_response(problem: ChainProblem, rng: random.Random, *, step_error: float, recheck: float) -> str:
    """A response for the supervised warm-up, with injected faults.

    Args:
        problem: the problem to answer.
        rng: source of randomness for the faults.
        step_error: probability that a running sum is a wrong digit (uniform over the nine others);
            later steps continue from the wrong value, so the final answer is then wrong.
        recheck: probability of each further ``=S`` re-check before the answer (geometric count).
    """
    total = problem.digits[0]
    sums = [str(total)]
    for digit in problem.digits[1:]:
        total = (total + digit) % 10
        if rng.random() < step_error:
            total = rng.choice([d for d in range(10) if d != total])
        sums.append(str(total))
    rechecks = 0
    while rng.random() < recheck:
        rechecks += 1
    return "".join(sums) + f"={total}" * rechecks + f"#{total}"


def make_examples(num: int, seed: int, exclude: set[str] | frozenset[str] = frozenset(), distinct: bool = False,
                  task: ChainTask = CHAIN) -> list[Example]:
    """``num`` problems of ``task`` as dataset examples, none of whose prompts is in ``exclude``.

    With ``distinct`` no prompt repeats; otherwise problems are i.i.d., which keeps the number of
    terms uniform (there are only 100 two-digit problems).
    """
    rng = random.Random(seed)
    examples: list[Example] = []
    seen = set(exclude)
    while len(examples) < num:
        problem = sample_problem(rng, task)
        if problem.prompt in seen:
            continue
        if distinct:
            seen.add(problem.prompt)
        examples.append(Example(prompt=problem.prompt, answer=problem.answer, metadata={"digits": list(problem.digits)}))
    return examples


def builtin_splits(train_size: int, eval_size: int, seed: int = 0, task: ChainTask = CHAIN) -> tuple[list[Example], list[Example]]:
    """Disjoint train and held-out sets of ``task`` (the held-out set is drawn first so it does not depend on train_size)."""
    held_out = make_examples(eval_size, seed=seed + 1_000_003, distinct=True, task=task)
    train = make_examples(train_size, seed=seed, exclude={e.prompt for e in held_out}, task=task)
    return train, held_out
