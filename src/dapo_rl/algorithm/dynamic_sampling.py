"""Dynamic sampling (DAPO §3.2): train only on groups that carry a gradient signal.

A group whose samples are all correct or all wrong has zero advantage everywhere, hence zero
policy gradient; it only dilutes the batch. DAPO keeps sampling until the batch holds B groups
with ``0 < #correct < G``. Groups are judged by *correctness*, not by the shaped reward: the
overlong penalty can spread the rewards of a group that is uniformly right or wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Sequence, TypeVar

import torch

T = TypeVar("T")

SURPLUS_POLICIES = ("keep", "drop")
EXHAUSTED_POLICIES = ("error", "train")


def informative_groups(correct: torch.Tensor) -> torch.Tensor:
    """Which groups have mixed outcomes.

    Args:
        correct: ``[num_groups, group_size]`` bool (or 0/1), True where a sample is correct.
    Returns:
        ``[num_groups]`` bool, True where ``0 < #correct < group_size``.
    """
    num_correct = correct.to(torch.int64).sum(dim=1)
    return (num_correct > 0) & (num_correct < correct.shape[1])


class DynamicSamplingExhausted(RuntimeError):
    """Raised when the batch could not be filled within ``max_rounds`` and the policy is ``error``."""


@dataclass
class SampledBatch(Generic[T]):
    """What one training step gets from the sampler."""

    groups: list[T]
    rounds: int  # generation rounds spent on this step
    groups_generated: int  # groups produced by those rounds
    groups_informative: int  # of which informative (all of them when filtering is off)
    exhausted: bool  # True when the round limit was hit and the batch holds fewer than B groups


@dataclass
class DynamicSampler(Generic[T]):
    """Accumulates groups over generation rounds and hands out B per training step.

    Usage per step::

        sampler.start_step()
        while sampler.needs_more():
            sampler.add(groups, correct)     # one generation round
        batch = sampler.take()

    Args:
        groups_per_step: B, the number of groups a training step consumes.
        enabled: filter out uninformative groups; off = every group is accepted (plain GRPO).
        max_rounds: generation rounds allowed per step before giving up (>= 1).
        on_exhausted: ``"error"`` raises :class:`DynamicSamplingExhausted`; ``"train"`` returns
            the (smaller, possibly empty) batch gathered so far with ``exhausted=True``.
        surplus: ``"keep"`` carries informative groups beyond B over to the next step;
            ``"drop"`` discards them (verl's behaviour).
    """

    groups_per_step: int
    enabled: bool = True
    max_rounds: int = 8
    on_exhausted: str = "error"
    surplus: str = "keep"
    _pool: list[T] = field(default_factory=list, init=False, repr=False)
    _rounds: int = field(default=0, init=False)
    _generated: int = field(default=0, init=False)
    _informative: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {self.groups_per_step}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.on_exhausted not in EXHAUSTED_POLICIES:
            raise ValueError(f"on_exhausted must be one of {EXHAUSTED_POLICIES}, got {self.on_exhausted!r}")
        if self.surplus not in SURPLUS_POLICIES:
            raise ValueError(f"surplus must be one of {SURPLUS_POLICIES}, got {self.surplus!r}")

    @property
    def pooled(self) -> int:
        """Groups waiting to be trained on (carried surplus included)."""
        return len(self._pool)

    @property
    def rounds(self) -> int:
        return self._rounds

    def start_step(self) -> None:
        """Reset the per-step counters; the carried surplus stays in the pool."""
        self._rounds = self._generated = self._informative = 0

    def needs_more(self) -> bool:
        """True while the pool holds fewer than B groups and rounds remain.

        Raises:
            DynamicSamplingExhausted: when the round limit is reached short of B and the policy is ``error``.
        """
        if len(self._pool) >= self.groups_per_step:
            return False
        if self._rounds < self.max_rounds:
            return True
        if self.on_exhausted == "error":
            raise DynamicSamplingExhausted(
                f"dynamic sampling found {len(self._pool)} of {self.groups_per_step} informative groups in "
                f"{self._rounds} generation rounds; raise dynamic_sampling.max_rounds, or set "
                f"dynamic_sampling.on_exhausted=train to train on what was found"
            )
        return False

    def add(self, groups: Sequence[T], correct: torch.Tensor) -> int:
        """Add one generation round.

        Args:
            groups: the round's groups, any payload.
            correct: ``[len(groups), group_size]`` correctness of each sample.
        Returns:
            The number of groups accepted into the pool.
        """
        if len(groups) != correct.shape[0]:
            raise ValueError(f"got {len(groups)} groups but correctness for {correct.shape[0]}")
        self._rounds += 1
        self._generated += len(groups)
        keep = informative_groups(correct) if self.enabled else torch.ones(len(groups), dtype=torch.bool)
        accepted = [group for group, k in zip(groups, keep.tolist()) if k]
        self._informative += len(accepted)
        self._pool.extend(accepted)
        return len(accepted)

    def take(self) -> SampledBatch[T]:
        """Hand out up to B groups; keep or drop the rest according to ``surplus``."""
        batch, rest = self._pool[: self.groups_per_step], self._pool[self.groups_per_step :]
        self._pool = rest if self.surplus == "keep" else []
        return SampledBatch(
            groups=batch,
            rounds=self._rounds,
            groups_generated=self._generated,
            groups_informative=self._informative,
            exhausted=len(batch) < self.groups_per_step,
        )

    def state_dict(self) -> dict:
        """The carried surplus, for checkpoints."""
        return {"pool": list(self._pool)}

    def load_state_dict(self, state: dict) -> None:
        self._pool = list(state["pool"])
