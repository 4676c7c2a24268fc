"""The built-in task: the sum of 2–6 digits modulo 10, written out as a chain of running sums.

A correct response writes the running sum after each digit, then the answer after ``#``::

    prompt:   3527..=        (digits right-padded with "." to six slots)
    response: 3807#7

Why this task: the answer is verifiable exactly; the reasoning part grows with the number of
terms, so response lengths vary; and the supervised warm-up data (see :func:`warmup_response`)
holds two faults that RL must remove: a wrong running sum with probability ``step_error`` (which
makes the final answer wrong) and useless ``=S`` re-checks before the answer (which make responses
long, sometimes longer than the cap, so that overlong filtering and the soft overlong punishment
have work to do). The prompt has a fixed width so that the digit a step reads always lies the
same number of tokens back: a tiny model learns that with one attention head, in seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dapo_rl.data.datasets import Example
from dapo_rl.rewards import register_reward

VOCAB = list("0123456789.=#")
MIN_TERMS = 2
MAX_TERMS = 6


@dataclass(frozen=True)
class ChainProblem:
    digits: tuple[int, ...]

    @property
    def prompt(self) -> str:
        """The digits, right-padded with ``.`` to ``MAX_TERMS`` slots, then ``=``."""
        return "".join(map(str, self.digits)).ljust(MAX_TERMS, ".") + "="

    @property
    def answer(self) -> str:
        return str(sum(self.digits) % 10)


def sample_problem(rng: random.Random, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS) -> ChainProblem:
    """A problem with a uniformly chosen number of digits."""
    return ChainProblem(tuple(rng.randrange(10) for _ in range(rng.randint(min_terms, max_terms))))


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


def extract_chain_answer(response: str) -> str | None:
    """The digit after the last ``#``, or None when the response has none."""
    head, sep, tail = response.rpartition("#")
    if not sep or len(tail.strip()) != 1 or not tail.strip().isdigit():
        return None
    return tail.strip()


@register_reward("chain")
def chain_reward(response: str, ground_truth: str, metadata: dict) -> bool:
    """Correct when the digit after the last ``#`` equals the ground truth (reward.correct / reward.incorrect)."""
    return extract_chain_answer(response) == ground_truth.strip()


def make_examples(num: int, seed: int, exclude: set[str] | frozenset[str] = frozenset(), distinct: bool = False) -> list[Example]:
    """``num`` problems as dataset examples, none of whose prompts is in ``exclude``.

    With ``distinct`` no prompt repeats; otherwise problems are i.i.d., which keeps the number of
    terms uniform (there are only 100 two-digit problems).
    """
    rng = random.Random(seed)
    examples: list[Example] = []
    seen = set(exclude)
    while len(examples) < num:
        problem = sample_problem(rng)
        if problem.prompt in seen:
            continue
        if distinct:
            seen.add(problem.prompt)
        examples.append(Example(prompt=problem.prompt, answer=problem.answer, metadata={"digits": list(problem.digits)}))
    return examples


def builtin_splits(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Disjoint train and held-out sets (the held-out set is drawn first so it does not depend on train_size)."""
    held_out = make_examples(eval_size, seed=seed + 1_000_003, distinct=True)
    train = make_examples(train_size, seed=seed, exclude={e.prompt for e in held_out})
    return train, held_out
