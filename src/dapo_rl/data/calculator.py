"""The built-in calculator task (``builtin:calculator``): sums of several multi-digit numbers, and
a calculator tool that solves them.

A problem is three numbers of two or three digits, right-padded with ``.`` to a fixed width::

    prompt:  347+81+295=

The model may answer in its head (``#723``) or call the calculator first, in the Hermes format
the ``hermes`` parser reads, and then answer with what it returned::

    turn 1:  <tool_call>{"name":"calculator","arguments":{"expression":"347+81+295"}}</tool_call></s>
    tool:    723
    turn 2:  #723</s>

The reward is the last number of the model's last turn (the ``last_number`` reward).

Why this task: a tiny model cannot add three such numbers reliably in its head, but it can learn
to copy the expression into a call and the tool's answer into its reply. The supervised warm-up
(see :func:`warmup_segments`) teaches the call format but calls the tool only part of the time
(``tool_rate``), and sometimes badly (``bad_call_rate``: the call forgets the last number, so
the tool answers a different sum). Each fault is one decision (to call; where the expression
ends), which RL can find; the copying itself is taught without faults. RL must then teach it to call, and to
call correctly; held-out accuracy and the tool-call rate show it (``eval/accuracy``,
``eval/tool_calls_mean``). As in the chain task, the fixed prompt width puts every digit a
fixed number of tokens before the place it is copied to.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass

from dapo_rl.data.datasets import Example

# Printable ASCII (tool errors and JSON are shown to the model as they are) and the ellipsis that
# marks a cut tool response.
VOCAB = [c for c in string.printable if c not in "\t\r\x0b\x0c"] + ["…"]
TOOL = "calculator"  # the tool's name: dapo_rl.tools.calculator:calculator


@dataclass(frozen=True)
class CalculatorTask:
    """Sums of ``terms`` numbers of ``min_digits``–``max_digits`` digits, and the warm-up's habits."""

    name: str = "calculator"
    terms: int = 3
    min_digits: int = 2
    max_digits: int = 3
    warmup_steps: int = 2000  # supervised warm-up steps of builtin:calculator-tiny (short sequences: seconds per hundred)
    tool_rate: float = 0.5  # warm-up: share of answers that call the tool
    bad_call_rate: float = 0.3  # warm-up: share of calls whose expression forgets the last number
    reward: str = "last_number"
    max_positions: int = 256  # the tiny model's context: a prompt and a two-turn trajectory
    min_greedy_accuracy = None  # no floor: a greedy check would need the tool (the warm-up is measured robust)

    @property
    def vocab(self) -> list[str]:
        return VOCAB

    @property
    def words(self) -> tuple[str, ...]:
        """The tokenizer's one-token pieces: the fixed text of a call around the expression, as a
        real tokenizer has tokens for ``<tool_call>`` and merges frequent JSON; the model still
        copies the expression digit by digit."""
        prefix, suffix = tool_call("EXPRESSION").split("EXPRESSION")
        return ("<tool_call>", "</tool_call>", prefix.removeprefix("<tool_call>"), suffix.removesuffix("</tool_call>"))

    @property
    def width(self) -> int:
        """Characters of the widest expression (prompts are padded to it)."""
        return self.terms * (self.max_digits + 1) - 1

    def sample_terms(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(_number(rng, rng.randint(self.min_digits, self.max_digits)) for _ in range(self.terms))

    def prompt(self, terms: tuple[int, ...]) -> str:
        return "+".join(map(str, terms)).ljust(self.width, ".") + "="

    def splits(self, train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """Disjoint train and held-out sets (the held-out set is drawn first, so it does not depend on train_size)."""
        held_out = self._examples(eval_size, seed + 1_000_003, exclude=frozenset())
        train = self._examples(train_size, seed, exclude=frozenset(e.prompt for e in held_out))
        return train, held_out

    def _examples(self, num: int, seed: int, exclude: frozenset[str]) -> list[Example]:
        rng = random.Random(seed)
        examples: list[Example] = []
        seen = set(exclude)
        while len(examples) < num:
            terms = self.sample_terms(rng)
            prompt = self.prompt(terms)
            if prompt in seen:
                continue
            seen.add(prompt)
            examples.append(Example(prompt=prompt, answer=str(sum(terms)), metadata={"terms": list(terms)}))
        return examples

    def warmup_segments(self, rng: random.Random, settings=None) -> list[tuple[str, bool]]:
        """One warm-up trajectory as ``(text, trained)`` segments: the prompt, the model's turns
        (trained, each followed by the end-of-turn token) and the tool's answers (not trained).

        With probability ``tool_rate`` the model calls the calculator (with probability
        ``bad_call_rate`` on a wrong expression) and replies with the result; otherwise it answers
        the true sum in its head, which it can only guess at.
        """
        terms = self.sample_terms(rng)
        prompt = self.prompt(terms)
        if rng.random() >= self.tool_rate:
            return [(prompt, False), (f"#{sum(terms)}", True)]
        called = list(terms)
        if rng.random() < self.bad_call_rate:
            called = called[:-1]  # forgets the last number: the tool answers a different sum
        expression = "+".join(map(str, called))
        result = str(sum(called))  # what dapo_rl.tools.calculator returns for this expression
        return [(prompt, False), (tool_call(expression), True), (result, False), (f"#{result}", True)]


def tool_call(expression: str) -> str:
    """The model's call of the calculator on ``expression``, as the ``hermes`` parser reads it."""
    payload = json.dumps({"name": TOOL, "arguments": {"expression": expression}}, separators=(",", ":"))
    return f"<tool_call>{payload}</tool_call>"


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1), 10 ** digits)


CALCULATOR = CalculatorTask()
