"""Dynamic sampling (DAPO §3.2): train only on groups that carry a gradient signal.

A group whose samples are all correct or all wrong has zero advantage everywhere, hence zero
policy gradient; it only dilutes the batch. DAPO keeps sampling until the batch holds B groups
with ``0 < #correct < G``. Groups are judged by *correctness*, not by the shaped reward: the
overlong penalty can spread the rewards of a group that is uniformly right or wrong.

What this module adds to the paper's rule, and why (verl: ``algorithm.filter_groups.*``):

- **Criteria** (:data:`GROUP_CRITERIA`, ``dynamic_sampling.criterion``): ``accuracy`` keeps
  ``lo < #correct/G < hi`` (band-pass; ``(0, 1)`` is DAPO's rule); ``reward_std`` keeps groups
  whose rewards spread more than ``min_reward_std`` (the unbiased std, the one the GRPO
  advantage divides by), for rewards that are not pass/fail. A criterion returns one boolean
  mask per rejection reason, so each reason is counted.
- **Round sizing.** p̂ estimates the fraction of generated groups the criterion accepts:
  ``p̂ = I / N`` with ``I ← β·I + accepted`` and ``N ← β·N + generated`` after every round,
  β = :data:`RATE_DECAY` (an exponential average over rounds, weighted by round size, kept in
  checkpoints; p̂ = 1 before the first round). A round asks for::

      n = min(max_prompts_per_round, ⌈margin · (B − have) / p̂⌉)      (n = max_prompts_per_round if p̂ = 0)

  prompts, ``have`` being the groups already pooled for this step. Over-sampling wastes nothing,
  because the surplus is kept; it only ages. With filtering off every group is accepted and a
  round asks for exactly ``B − have``.
- **Never abort by default** (``on_exhausted="train"``): past ``max_rounds`` (verl
  ``max_num_gen_batches``) the step trains on the groups found, possibly none.
- **Surplus with an age.** Accepted groups beyond B wait for the next step, tagged with the
  policy version (optimiser update count) that sampled them. A group older than
  ``max_surplus_age`` updates at the start of a step is dropped and counted; the oldest groups
  are trained first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import torch

from dapo_rl.algorithm.registry import Registry

T = TypeVar("T")

SURPLUS_POLICIES = ("keep", "drop")
EXHAUSTED_POLICIES = ("error", "train")
# β of the informative-rate estimate: a round's weight halves with every later round, so p̂
# follows an accuracy that drifts over training within a few steps, while a round of a dozen
# groups cannot swing it alone.
RATE_DECAY = 0.5
# Guards the round-size ceiling against float noise (1.3 · 10 / 1 = 13.000000000000002).
_CEIL_SLACK = 1e-9


def informative_groups(correct: torch.Tensor) -> torch.Tensor:
    """Which groups have mixed outcomes.

    Args:
        correct: ``[num_groups, group_size]`` bool (or 0/1), True where a sample is correct.
    Returns:
        ``[num_groups]`` bool, True where ``0 < #correct < group_size``.
    """
    num_correct = correct.to(torch.int64).sum(dim=1)
    return (num_correct > 0) & (num_correct < correct.shape[1])


@dataclass(frozen=True)
class GroupFilter:
    """The settings every criterion receives.

    Attributes:
        accuracy_range: ``(lo, hi)``; ``accuracy`` keeps ``lo < #correct/G < hi``.
        min_reward_std: ``reward_std`` keeps groups whose reward std exceeds it.
    """

    accuracy_range: tuple[float, float] = (0.0, 1.0)
    min_reward_std: float = 0.0


# criterion(correct [N, G] bool, rewards [N, G] float, settings) -> {reason: [N] bool rejected}
GroupCriterion = Callable[[torch.Tensor, torch.Tensor, GroupFilter], dict[str, torch.Tensor]]
GROUP_CRITERIA: Registry[GroupCriterion] = Registry("dynamic-sampling criterion")


@GROUP_CRITERIA.register("accuracy")
def accuracy_criterion(correct: torch.Tensor, rewards: torch.Tensor, settings: GroupFilter) -> dict[str, torch.Tensor]:
    """Band-pass on accuracy: reject ``#correct/G <= lo`` (too hard) and ``>= hi`` (too easy).

    The accuracy is ``k / G`` in float64, the same number the user's decimal ``lo``/``hi`` parse
    to, so an accuracy equal to a bound is rejected (e.g. lo = 0.3, G = 10, k = 3).
    """
    lo, hi = settings.accuracy_range
    accuracy = correct.to(torch.float64).sum(dim=1) / correct.shape[1]
    return {"too_hard": accuracy <= lo, "too_easy": accuracy >= hi}


@GROUP_CRITERIA.register("reward_std")
def reward_std_criterion(correct: torch.Tensor, rewards: torch.Tensor, settings: GroupFilter) -> dict[str, torch.Tensor]:
    """Reject groups whose rewards' unbiased std is ``<= min_reward_std``.

    A group of equal rewards has std exactly 0 (not the rounding residue of its mean), so the
    default ``min_reward_std = 0`` rejects exactly the groups with zero advantage.
    """
    r = rewards.to(torch.float64)
    std = torch.where(r.amax(dim=1) == r.amin(dim=1), torch.zeros(r.shape[0], dtype=torch.float64), r.std(dim=1))
    return {"low_reward_std": std <= settings.min_reward_std}


class DynamicSamplingExhausted(RuntimeError):
    """Raised when the batch could not be filled within ``max_rounds`` and the policy is ``error``."""


@dataclass
class SampledBatch(Generic[T]):
    """What one training step gets from the sampler, and how it was gathered."""

    groups: list[T]
    ages: list[int]  # per group: policy updates between its sampling and this step (0 = fresh)
    rounds: int  # generation rounds spent on this step
    groups_generated: int  # groups (= prompts) produced by those rounds
    groups_informative: int  # of which accepted by the criterion (all of them when filtering is off)
    exhausted: bool  # True when the round limit was hit and the batch holds fewer than B groups
    rejected: dict[str, int] = field(default_factory=dict)  # rejection reason -> groups
    missing: int = 0  # B minus the surplus carried in: what the rounds had to find
    rate_estimate: float = 1.0  # p̂ at the start of the step
    carried_in: int = 0  # surplus groups at the start of the step, after the age bound
    carried_used: int = 0  # of which trained in this batch
    carried_out: int = 0  # accepted groups left for the next step
    dropped_by_age: int = 0  # surplus groups older than max_surplus_age, dropped at the start
    dropped_surplus: int = 0  # accepted groups beyond B discarded under surplus="drop"

    @property
    def oversample_factor(self) -> float:
        """Prompts generated per group that was missing at the start of the step (0 if none was)."""
        return self.groups_generated / self.missing if self.missing else 0.0


@dataclass
class DynamicSampler(Generic[T]):
    """Accumulates groups over generation rounds and hands out B per training step.

    Usage per step::

        sampler.start_step(policy_version)
        while sampler.needs_more():
            n = sampler.round_size()                  # prompts to generate this round
            sampler.add(groups, correct, rewards)     # one generation round of n groups
        batch = sampler.take()

    Args:
        groups_per_step: B, the number of groups a training step consumes.
        enabled: filter groups by ``criterion``; off = every group is accepted (plain GRPO).
        max_rounds: generation rounds allowed per step before giving up (>= 1); verl
            ``filter_groups.max_num_gen_batches``.
        on_exhausted: ``"train"`` returns the (smaller, possibly empty) batch gathered so far with
            ``exhausted=True``; ``"error"`` raises :class:`DynamicSamplingExhausted`.
        surplus: ``"keep"`` carries accepted groups beyond B over to the next step; ``"drop"``
            discards them (verl's behaviour).
        criterion: a :data:`GROUP_CRITERIA` name or ``pkg.module:function``.
        accuracy_range, min_reward_std: the criterion's settings (:class:`GroupFilter`).
        max_surplus_age: carried groups sampled more than this many policy updates ago are dropped.
        max_prompts_per_round: the largest round; None = 4 × B.
        oversample_margin: the safety factor of :meth:`round_size` (>= 1).
    """

    groups_per_step: int
    enabled: bool = True
    max_rounds: int = 8
    on_exhausted: str = "train"
    surplus: str = "keep"
    criterion: str = "accuracy"
    accuracy_range: tuple[float, float] = (0.0, 1.0)
    min_reward_std: float = 0.0
    max_surplus_age: int = 1
    max_prompts_per_round: int | None = None
    oversample_margin: float = 1.3
    _pool: list[tuple[T, int | None]] = field(default_factory=list, init=False, repr=False)
    _version: int = field(default=0, init=False)
    _rate_sums: tuple[float, float] = field(default=(0.0, 0.0), init=False)  # (I, N) of p̂ = I / N
    _exhausted_total: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        # Each message opens with the field's name: the configuration (section dynamic_sampling)
        # is checked by building the sampler, and prefixes the section.
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(self.groups_per_step >= 1, f"groups_per_step: must be >= 1, got {self.groups_per_step}")
        require(self.max_rounds >= 1, f"max_rounds: must be >= 1, got {self.max_rounds}; the paper allows several rounds, e.g. 8")
        require(self.on_exhausted in EXHAUSTED_POLICIES,
                f"on_exhausted: {self.on_exhausted!r} is not valid; use one of {', '.join(EXHAUSTED_POLICIES)}")
        require(self.surplus in SURPLUS_POLICIES, f"surplus: {self.surplus!r} is not valid; use one of {', '.join(SURPLUS_POLICIES)}")
        self.accuracy_range = tuple(self.accuracy_range)  # a configuration gives a list
        require(len(self.accuracy_range) == 2 and 0.0 <= self.accuracy_range[0] < self.accuracy_range[1] <= 1.0,
                f"accuracy_range: must be [lo, hi] with 0 <= lo < hi <= 1, got {list(self.accuracy_range)}; "
                f"DAPO keeps 0 < accuracy < 1: [0, 1]")
        lo, hi = self.accuracy_range
        require(self.min_reward_std >= 0, f"min_reward_std: must be >= 0, got {self.min_reward_std}; "
                                          f"0 keeps every group whose rewards are not all equal")
        require(self.max_surplus_age >= 0, f"max_surplus_age: must be >= 0, got {self.max_surplus_age}; "
                                           f"counted in optimiser updates; default 1")
        if self.max_prompts_per_round is None:
            self.max_prompts_per_round = 4 * self.groups_per_step
        require(self.max_prompts_per_round >= self.groups_per_step,
                f"max_prompts_per_round: {self.max_prompts_per_round} is below prompts_per_step={self.groups_per_step} "
                f"(the groups per step); use null (4 × prompts_per_step) or a larger count")
        require(self.oversample_margin >= 1, f"oversample_margin: must be >= 1, got {self.oversample_margin}; default 1.3")
        try:
            self._criterion = GROUP_CRITERIA.get(self.criterion)
        except ValueError as exc:
            raise ValueError(f"criterion: {exc}") from None
        self._filter = GroupFilter((float(lo), float(hi)), float(self.min_reward_std))
        self._reset_step()

    def _reset_step(self) -> None:
        self._rounds = self._generated = self._accepted = 0
        self._rejected: dict[str, int] = {}
        self._carried_in = self._dropped_by_age = self._missing = 0
        self._rate_at_start = self.rate_estimate

    @property
    def pooled(self) -> int:
        """Groups waiting to be trained on (carried surplus included)."""
        return len(self._pool)

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def rate_estimate(self) -> float:
        """p̂, the estimated fraction of generated groups the criterion accepts (1 before any round)."""
        accepted, generated = self._rate_sums
        return accepted / generated if generated > 0 else 1.0

    @property
    def exhausted_total(self) -> int:
        """Steps, over the whole run, that ended short of B at the round limit."""
        return self._exhausted_total

    def start_step(self, policy_version: int = 0) -> None:
        """Begin a step under the policy that has had ``policy_version`` optimiser updates.

        Carried groups older than ``max_surplus_age`` updates are dropped (and counted).
        """
        self._version = policy_version
        self._reset_step()
        # Checkpoints from before versions were kept hold untagged groups: take them as fresh.
        self._pool = [(group, policy_version if version is None else version) for group, version in self._pool]
        kept = [(g, v) for g, v in self._pool if policy_version - v <= self.max_surplus_age]
        self._dropped_by_age = len(self._pool) - len(kept)
        self._pool = kept
        self._carried_in = len(kept)
        self._missing = max(0, self.groups_per_step - len(kept))

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

    def round_size(self) -> int:
        """Prompts to generate in the next round (see the module docstring for the rule)."""
        need = max(0, self.groups_per_step - len(self._pool))
        assert self.max_prompts_per_round is not None
        if not self.enabled:
            return need
        p = self.rate_estimate
        if p <= 0:
            return self.max_prompts_per_round
        return min(self.max_prompts_per_round, max(need, math.ceil(self.oversample_margin * need / p - _CEIL_SLACK)))

    def add(self, groups: Sequence[T], correct: torch.Tensor, rewards: torch.Tensor | None = None,
            policy_version: int | None = None) -> int:
        """Add one generation round.

        Args:
            groups: the round's groups, any payload.
            correct: ``[len(groups), group_size]`` correctness of each sample.
            rewards: ``[len(groups), group_size]`` rewards (for ``reward_std``); default ``correct`` as 0/1.
            policy_version: the version that sampled the round, when older than the step's (a
                round sampled ahead, one step off); default the step's.
        Returns:
            The number of groups accepted into the pool.
        """
        if len(groups) != correct.shape[0]:
            raise ValueError(f"got {len(groups)} groups but correctness for {correct.shape[0]}")
        rewards = correct.to(torch.float64) if rewards is None else rewards
        if rewards.shape != correct.shape:
            raise ValueError(f"rewards {tuple(rewards.shape)} and correct {tuple(correct.shape)} differ in shape")
        self._rounds += 1
        self._generated += len(groups)
        keep = torch.ones(len(groups), dtype=torch.bool)
        if self.enabled and len(groups):
            for reason, rejected in self._criterion(correct.to(torch.bool), rewards, self._filter).items():
                # A group rejected for two reasons is counted under the first only.
                newly = rejected.to(torch.bool) & keep
                self._rejected[reason] = self._rejected.get(reason, 0) + int(newly.sum())
                keep &= ~newly
        version = self._version if policy_version is None else policy_version
        accepted = [(group, version) for group, k in zip(groups, keep.tolist()) if k]
        self._accepted += len(accepted)
        self._pool.extend(accepted)
        decay = RATE_DECAY
        self._rate_sums = (decay * self._rate_sums[0] + len(accepted), decay * self._rate_sums[1] + len(groups))
        return len(accepted)

    def take(self) -> SampledBatch[T]:
        """Hand out up to B groups, oldest first; keep or drop the rest according to ``surplus``."""
        batch, rest = self._pool[: self.groups_per_step], self._pool[self.groups_per_step :]
        self._pool = rest if self.surplus == "keep" else []
        exhausted = len(batch) < self.groups_per_step
        self._exhausted_total += exhausted
        return SampledBatch(
            groups=[g for g, _ in batch],
            ages=[self._version - v for _, v in batch],  # type: ignore[operator]
            rounds=self._rounds,
            groups_generated=self._generated,
            groups_informative=self._accepted,
            exhausted=exhausted,
            rejected=dict(self._rejected),
            missing=self._missing,
            rate_estimate=self._rate_at_start,
            carried_in=self._carried_in,
            carried_used=min(self._carried_in, len(batch)),
            carried_out=len(self._pool),
            dropped_by_age=self._dropped_by_age,
            dropped_surplus=0 if self.surplus == "keep" else len(rest),
        )

    def state_dict(self) -> dict:
        """The carried surplus with its versions, p̂'s sums and the exhausted-step count, for checkpoints."""
        return {"pool": [g for g, _ in self._pool], "versions": [v for _, v in self._pool],
                "rate_sums": self._rate_sums, "exhausted_total": self._exhausted_total}

    def load_state_dict(self, state: dict) -> None:
        # Older checkpoints hold bare groups (no version) and no p̂: those start afresh.
        versions = state.get("versions", [None] * len(state["pool"]))
        self._pool = list(zip(state["pool"], versions))
        self._rate_sums = tuple(state.get("rate_sums", (0.0, 0.0)))  # type: ignore[assignment]
        self._exhausted_total = int(state.get("exhausted_total", 0))
        self._rate_at_start = self.rate_estimate
