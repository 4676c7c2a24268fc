"""Rollout collection: prompts → G samples each → rewards → the dynamic sampler, until the step
holds B informative groups (or the sampler's rounds run out); and the rollout metrics.

Every rank sees the same prompts; rank r samples prompts r, r + W, ... and the scored groups are
all-gathered in prompt order, so the dynamic sampler (its round sizes, its p̂) and the prompt
stream's difficulty memory decide identically on every rank.

One-step-off overlap (``rollout.async_steps=1``, an engine that ``samples_in_background``, i.e. ``vllm-server``;
verl's one-step-off async trainer, AReaL/prime-rl with staleness 1): when a step's batch is
taken, the next step's first round is sent at once (:class:`PendingRound`), so the server samples
it from this step's weights while the trainer updates. The next step uses it as its first round;
its groups carry this step's policy version, so the age bound and the rollout correction see them
as off-policy by one step (``updates_per_step`` optimiser updates). Its round size is the
sampler's round size right after ``take`` (aged surplus is dropped only when the next step
starts; a shortfall is made up by a normal round). The engine waits for it before the next
weight push, so no sample mixes two policies. A checkpoint holds it with its samples when they
have arrived (resume is then exact); a round still in flight when a checkpoint is forced (server
death) is regenerated on resume from the same prompts and seed, with the restored weights.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dapo_rl.algorithm import DynamicSampler, informative_groups, soft_overlong_penalty
from dapo_rl.config import Config, ConfigError
from dapo_rl.data.encoding import EncodedPrompt
from dapo_rl.data.stream import PromptStream
from dapo_rl.rewards import score_responses
from dapo_rl.rollout.base import RolloutEngine, Sample, SamplingParams
from dapo_rl.rollout.multi_turn import MultiTurnSampler, environment_result, last_model_turn, trajectory_metrics
from dapo_rl.training.distributed import DistContext


@dataclass
class ScoredGroup:
    """One prompt's G samples with their rewards. The unit the dynamic sampler keeps or drops."""

    prompt: EncodedPrompt
    samples: list[Sample]
    scores: list[float]  # shaped reward: rule-based + soft overlong penalty
    correct: list[bool]  # is_equivalent; dynamic sampling judges by this
    # Optimiser updates the policy had when it sampled this group (carried surplus is older than
    # the policy it trains; samples[i].logprobs hold that policy's π_rollout).
    policy_version: int = 0


@dataclass
class PendingRound:
    """A round sent ahead (``rollout.async_steps=1``): the prompt indices of the whole round (the
    same on every rank), this rank's base seed, the policy version that samples it, and this
    rank's results (a future while in flight)."""

    indices: list[int]
    seed: int | None
    policy_version: int
    future: Future | None = None
    samples: list[list[Sample]] | None = None

    def state_dict(self) -> dict:
        """Indices, seed, version, and the samples if they arrived (not waited for)."""
        samples = self.samples
        if samples is None and self.future is not None and self.future.done() and self.future.exception() is None:
            samples = self.future.result()
        return {"indices": list(self.indices), "seed": self.seed, "policy_version": self.policy_version, "samples": samples}


__all__ = ["PendingRound", "PromptStream", "RolloutCollector", "ScoredGroup"]


class RolloutCollector:
    """Generates and scores rounds of prompts, sized by the dynamic sampler, until it holds B
    informative groups or its rounds run out."""

    def __init__(self, config: Config, engine: RolloutEngine, tokenizer: Any, reward_fn: Callable[..., Any],
                 prompts: list[EncodedPrompt], dist: DistContext):
        self.cfg = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.dist = dist
        self.stream = PromptStream(prompts, config.seed, retire_solved_after=config.data.retire_solved_after,
                                   unsolved_weight=config.data.unsolved_weight)
        # The section's keys are the sampler's own arguments (it checks them).
        self.sampler: DynamicSampler[ScoredGroup] = DynamicSampler(groups_per_step=config.prompts_per_step,
                                                                   **dataclasses.asdict(config.dynamic_sampling))
        self._warned_exhausted = False  # the round-limit warning is printed once per run
        self.async_steps = config.rollout.async_steps
        if self.async_steps and not engine.samples_in_background:
            raise ConfigError(f"rollout.async_steps=1 needs an engine that samples in the background (rollout.engine=vllm-server), "
                              f"not {type(engine).__name__}")
        self.pending: PendingRound | None = None
        self.multi_turn = MultiTurnSampler.from_config(config.rollout, engine, tokenizer)  # None: one turn
        self.sampling = SamplingParams(
            temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
            max_new_tokens=config.rollout.max_response_length, stop_token_ids=tuple(config.rollout.stop_token_ids),
        )

    def sample(self, prompts: list[EncodedPrompt]) -> list[list[Sample]]:
        """``group_size`` samples of each prompt: one turn from the engine, or multi-turn trajectories."""
        if self.multi_turn is None:
            return self.engine.generate([list(p.ids) for p in prompts], self.cfg.group_size, self.sampling)
        return self.multi_turn.generate_for(prompts, self.cfg.group_size, self.sampling)

    def score(self, prompts: list[EncodedPrompt], groups: list[list[Sample]]) -> tuple[list[ScoredGroup], int, dict[str, list[float]]]:
        """Rule-based reward + soft overlong penalty for every sample; returns the groups, the
        number of reward calls that failed (raised or timed out: scored as incorrect) and the
        reward's own metrics as name → [sum, count] (a TRL-style function's values, ``answer_found``).

        A multi-turn sample is judged on the model's last turn (its final answer; the environment's
        messages are not the model's words); an environment's ``reward()`` replaces the reward
        function, and an environment that failed scores as incorrect."""
        flat = [(prompt, sample) for prompt, group in zip(prompts, groups) for sample in group]
        ids = [last_model_turn(s) for _, s in flat]
        texts = [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        results = score_responses(self.reward_fn, texts, [p.example.answer for p, _ in flat],
                                  [dict(p.example.metadata) for p, _ in flat], self.cfg.reward.timeout_s,
                                  prompts=[p.example.prompt for p, _ in flat], completion_ids=[list(i) for i in ids])
        reward_metrics: dict[str, list[float]] = {}
        for r in results:
            for name, value in r.metrics.items():
                total = reward_metrics.setdefault(name, [0.0, 0.0])
                total[0] += value
                total[1] += 1
        results = [environment_result(s.trajectory, r, self.cfg.reward.correct, self.cfg.reward.incorrect)
                   for (_, s), r in zip(flat, results)]
        scores = torch.tensor([r.score for r in results], dtype=torch.float64)
        if self.cfg.overlong.soft_punishment:
            lengths = torch.tensor([len(s.response_ids) for _, s in flat])
            scores = scores + soft_overlong_penalty(lengths, self.cfg.rollout.max_response_length, self.cfg.overlong.cache_length).double()
        g = self.cfg.group_size
        scored = [ScoredGroup(prompt=prompts[i], samples=groups[i], scores=scores[i * g : (i + 1) * g].tolist(),
                              correct=[r.correct for r in results[i * g : (i + 1) * g]]) for i in range(len(prompts))]
        return scored, sum(r.failed for r in results), reward_metrics

    def collect(self, step: int, policy_version: int) -> tuple[list[ScoredGroup], dict[str, float]]:
        """This step's training groups (step = the 0-based index of the step being collected),
        and the rollout metrics. The caller holds the model's full parameters (FSDP2).

        ``policy_version`` is the number of optimiser updates applied so far (the trainer's
        ``policy_version``); it tags the groups sampled now and ages the carried ones.
        """
        cfg, dist = self.cfg, self.dist
        self.sampler.start_step(policy_version)
        generated: list[ScoredGroup] = []
        gen_time = score_time = 0.0
        failures = 0
        reward_metrics: dict[str, list[float]] = {}
        ahead = 0.0  # groups of this step sampled ahead, by the previous step's weights
        while self.sampler.needs_more():
            t0 = time.perf_counter()
            if self.pending is not None:
                indices, groups, version = self._take_pending(policy_version)
                prompts = [self.stream.prompts[i] for i in indices]
                mine = prompts[dist.rank :: dist.world_size]
                ahead = float(len(indices))
            else:
                indices = self.stream.take_indices(self.sampler.round_size())  # the same on every rank
                prompts = [self.stream.prompts[i] for i in indices]
                mine = prompts[dist.rank :: dist.world_size]
                groups = self.sample(mine) if mine else []
                version = policy_version
            t1 = time.perf_counter()
            scored, failed, round_metrics = self.score(mine, groups)
            score_time += time.perf_counter() - t1
            gen_time += t1 - t0
            shares = [(scored, failed, round_metrics)]
            if dist.enabled:  # every rank gets every group, in prompt order
                shares = dist.all_gather_objects((scored, failed, round_metrics))
                scored = [shares[i % dist.world_size][0][i // dist.world_size] for i in range(len(prompts))]
                failed = sum(share[1] for share in shares)
            failures += failed
            for share in shares:
                for name, (total, count) in share[2].items():
                    kept = reward_metrics.setdefault(name, [0.0, 0.0])
                    kept[0] += total
                    kept[1] += count
            for index, group in zip(indices, scored):
                group.policy_version = version
                self.stream.record(index, group.correct)
            generated.extend(scored)
            self.sampler.add(scored, torch.tensor([s.correct for s in scored], dtype=torch.bool),
                             torch.tensor([s.scores for s in scored], dtype=torch.float64), policy_version=version)
        batch = self.sampler.take()
        if self.async_steps and step + 1 < cfg.steps:
            self._send_ahead(policy_version)
        # Policy statistics come from everything generated this step (the trained batch is
        # biased toward 50% accuracy by dynamic sampling); a step fed only by carried surplus
        # reports its batch instead.
        seen = generated or batch.groups
        samples = [s for grp in seen for s in grp.samples]
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
        new_tokens = sum(len(s.response_ids) for grp in generated for s in grp.samples) / dist.world_size
        metrics = {
            "train/reward_mean": sum(sum(g.scores) for g in seen) / len(samples) if samples else 0.0,
            "train/accuracy": sum(sum(g.correct) for g in seen) / len(samples) if samples else 0.0,
            "train/response_length_mean": lengths.mean().item() if samples else 0.0,
            "train/response_length_max": lengths.max().item() if samples else 0.0,
            "train/truncated_frac": sum(s.truncated for s in samples) / len(samples) if samples else 0.0,
            # Judged on every generated group, also when dynamic sampling is off (the sampler then
            # accepts all groups): how much of the batch carries a gradient signal is the point.
            "train/informative_group_frac": (informative_groups(torch.tensor([g.correct for g in generated], dtype=torch.bool)).sum().item()
                                             / len(generated)) if generated else 0.0,
            "train/generation_rounds": float(batch.rounds),
            "train/samples_generated": float(len(generated) * cfg.group_size),
            "train/batch_groups": float(len(batch.groups)),
            "train/reward_failures": float(failures),
            # The reward's own numbers, each the mean over the responses that reported it (TRL rewards/<name>/mean).
            **{f"reward/{name}": total / count for name, (total, count) in sorted(reward_metrics.items()) if count},
            "train/sampling_exhausted": float(batch.exhausted),
            "train/sampling_exhausted_total": float(self.sampler.exhausted_total),
            **self._sampling_metrics(batch),
            **trajectory_metrics([s for grp in generated for s in grp.samples]),
            "rollout/groups_sampled_ahead": ahead,
            "time/generation_s": gen_time,
            "time/scoring_s": score_time,
            "perf/generation_tokens_per_s": new_tokens / gen_time if gen_time > 0 else 0.0,
        }
        if batch.exhausted and not self._warned_exhausted:
            self._warned_exhausted = True
            outcome = "training on those" if batch.groups else "update skipped"
            tqdm.write(f"step {step + 1}: dynamic sampling found {len(batch.groups)} of {cfg.prompts_per_step} informative "
                       f"groups in {batch.rounds} rounds; {outcome} (dynamic_sampling.max_rounds={cfg.dynamic_sampling.max_rounds}; "
                       f"said once per run, every such step is counted in train/sampling_exhausted)")
        return batch.groups, metrics

    def _send_ahead(self, policy_version: int) -> None:
        """Send the next step's first round now, to be sampled by the current weights."""
        size = self.sampler.round_size()
        if size <= 0:
            return  # the carried surplus already fills the next step
        indices = self.stream.take_indices(size)
        mine = [list(self.stream.prompts[i].ids) for i in indices[self.dist.rank :: self.dist.world_size]]
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if self.sampling.temperature > 0 else None
        future = self.engine.submit(mine, self.cfg.group_size, self.sampling, seed=seed) if mine else None
        self.pending = PendingRound(indices, seed, policy_version, future, None if mine else [])

    def _take_pending(self, policy_version: int) -> tuple[list[int], list[list[Sample]], int]:
        """The round sent ahead: its indices, this rank's groups and the version that sampled
        them. One restored from a checkpoint without samples is sampled again now, from the same
        prompts and seed, by the current weights (and tagged with their version)."""
        pending, self.pending = self.pending, None
        assert pending is not None
        if pending.samples is not None:
            return pending.indices, pending.samples, pending.policy_version
        if pending.future is not None:
            return pending.indices, pending.future.result(), pending.policy_version
        mine = [list(self.stream.prompts[i].ids) for i in pending.indices[self.dist.rank :: self.dist.world_size]]
        groups = self.engine.submit(mine, self.cfg.group_size, self.sampling, seed=pending.seed).result()
        return pending.indices, groups, policy_version

    def state_dict(self) -> dict:
        """This rank's round sent ahead (see :class:`PendingRound`), for checkpoints."""
        return {"pending": None if self.pending is None else self.pending.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        pending = (state or {}).get("pending")
        self.pending = None if pending is None else PendingRound(pending["indices"], pending["seed"], pending["policy_version"],
                                                                 None, pending["samples"])

    def _sampling_metrics(self, batch: Any) -> dict[str, float]:
        """The sampler's and the prompt stream's per-step numbers (``sampling/*``)."""
        carried_ages = batch.ages[: batch.carried_used]
        metrics = {
            "sampling/rate_estimate": batch.rate_estimate,  # p̂ that sized this step's first round
            "sampling/oversample_factor": batch.oversample_factor,
            "sampling/surplus_carried": float(batch.carried_in),
            "sampling/surplus_used": float(batch.carried_used),
            "sampling/surplus_left": float(batch.carried_out),
            "sampling/surplus_dropped_age": float(batch.dropped_by_age),
            "sampling/surplus_dropped": float(batch.dropped_surplus),
            "sampling/surplus_age_mean": sum(carried_ages) / len(carried_ages) if carried_ages else 0.0,
            "sampling/surplus_age_max": float(max(carried_ages, default=0)),
            "sampling/prompts_retired": float(self.stream.retired),
            "sampling/prompts_never_solved": float(self.stream.never_solved),
        }
        for reason in ("too_hard", "too_easy", "low_reward_std"):
            metrics[f"sampling/rejected_{reason}"] = float(batch.rejected.get(reason, 0))
        for reason, count in batch.rejected.items():  # a custom criterion's own reasons
            metrics[f"sampling/rejected_{reason}"] = float(count)
        return metrics
