"""The training prompts' order: endless shuffled passes, with a memory of how hard each prompt is.

Difficulty memory (both off by default, so the order is then a plain seeded shuffle per pass):

- **Retirement** (``data.retire_solved_after = k``, 0 = off): a prompt whose group was
  all-correct on k consecutive visits leaves the stream for good; a visit with any wrong
  sample resets its count. It can teach nothing more, and would only cost generation.
- **Unsolved weight** (``data.unsolved_weight = w`` in [0, 1], 1 = off): a prompt visited at
  least once and never answered correctly by any sample enters each later pass with probability
  w (one seeded draw per prompt and pass). Prompts never visited, or solved at least once,
  always enter. With w = 0.5 an unsolved prompt comes back every second pass on average.

Each pass's order is drawn when the pass begins, from the seed, the pass number and the memory
at that moment, and kept in :meth:`PromptStream.state_dict`, so a resumed run serves exactly the
prompts the uninterrupted one would. Retirement never empties the stream: a pass that would hold
no prompt takes every prompt not retired, and if all are retired, every prompt.
"""

from __future__ import annotations

import random
from typing import Any, Sequence


class PromptStream:
    """Endless passes over ``prompts`` in a seeded order, with a position that checkpoints restore.

    Args:
        prompts: the training prompts, any payload.
        seed: the run's seed; pass ``e``'s order depends only on it, ``e`` and the memory.
        retire_solved_after: k of the module docstring (0 = off).
        unsolved_weight: w of the module docstring (1 = off).
    """

    def __init__(self, prompts: Sequence[Any], seed: int, *, retire_solved_after: int = 0, unsolved_weight: float = 1.0):
        if not prompts:
            raise ValueError("no training prompts")
        if retire_solved_after < 0:
            raise ValueError(f"retire_solved_after must be >= 0, got {retire_solved_after}")
        if not 0.0 <= unsolved_weight <= 1.0:
            raise ValueError(f"unsolved_weight must be in [0, 1], got {unsolved_weight}")
        self.prompts = list(prompts)
        self.seed = seed
        self.retire_solved_after = retire_solved_after
        self.unsolved_weight = unsolved_weight
        self.epoch = 0
        self.position = 0
        self._streak: dict[int, int] = {}  # prompt index -> consecutive all-correct visits
        self._retired: set[int] = set()
        self._solved: set[int] = set()  # ever answered correctly by at least one sample
        self._visited: set[int] = set()
        self._order = self._pass_order(0)

    @property
    def retired(self) -> int:
        """Prompts retired so far."""
        return len(self._retired)

    @property
    def never_solved(self) -> int:
        """Prompts visited at least once and never answered correctly."""
        return len(self._visited - self._solved)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _pass_order(self, epoch: int) -> list[int]:
        order = self._shuffled(epoch)
        if not self._retired and (self.unsolved_weight >= 1.0 or not self._visited - self._solved):
            return order
        active = [i for i in order if i not in self._retired] or order
        rng = random.Random(self.seed * 1_000_003 + epoch + 7_777_777)
        unsolved = self._visited - self._solved
        # One draw per unsolved prompt, in pass order, so the draws depend on nothing else.
        weighted = [i for i in active if i not in unsolved or rng.random() < self.unsolved_weight]
        return weighted or active

    def take_indices(self, count: int) -> list[int]:
        """The indices of the next ``count`` prompts (a pass boundary starts a new order)."""
        out: list[int] = []
        while len(out) < count:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._pass_order(self.epoch)
            index = self._order[self.position]
            self.position += 1
            # Retired after this pass's order was drawn (its visit was still being scored then).
            if index in self._retired and len(self._retired) < len(self.prompts):
                continue
            out.append(index)
        return out

    def take(self, count: int) -> list[Any]:
        """The next ``count`` prompts."""
        return [self.prompts[i] for i in self.take_indices(count)]

    def record(self, index: int, correct: Sequence[bool]) -> None:
        """Remember one visit of prompt ``index``: its group's correctness, one bool per sample."""
        self._visited.add(index)
        if any(correct):
            self._solved.add(index)
        if self.retire_solved_after <= 0:
            return
        if correct and all(correct):
            self._streak[index] = self._streak.get(index, 0) + 1
            if self._streak[index] >= self.retire_solved_after:
                self._retired.add(index)
        else:
            self._streak.pop(index, None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": list(self._order),
                "streak": dict(self._streak), "retired": sorted(self._retired), "solved": sorted(self._solved),
                "visited": sorted(self._visited)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        # Checkpoints from before the memory existed hold only the position: a plain shuffle.
        self._streak = {int(k): int(v) for k, v in state.get("streak", {}).items()}
        self._retired = set(state.get("retired", ()))
        self._solved = set(state.get("solved", ()))
        self._visited = set(state.get("visited", ()))
        self._order = list(state["order"]) if "order" in state else self._shuffled(self.epoch)
