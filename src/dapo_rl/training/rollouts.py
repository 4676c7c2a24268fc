"""Rollout collection: prompts → G samples each → rewards → the dynamic sampler, until the step
holds B informative groups (or the sampler's rounds run out); and the rollout metrics.

Every rank sees the same prompts; rank r samples prompts r, r + W, ... and the scored groups are
all-gathered in prompt order, so the dynamic sampler decides identically on every rank.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dapo_rl.algorithm import DynamicSampler, informative_groups, soft_overlong_penalty
from dapo_rl.config import Config
from dapo_rl.data.encoding import EncodedPrompt
from dapo_rl.rewards import score_responses
from dapo_rl.rollout.base import RolloutEngine, Sample, SamplingParams
from dapo_rl.training.distributed import DistContext


@dataclass
class ScoredGroup:
    """One prompt's G samples with their rewards. The unit the dynamic sampler keeps or drops."""

    prompt: EncodedPrompt
    samples: list[Sample]
    scores: list[float]  # shaped reward: rule-based + soft overlong penalty
    correct: list[bool]  # is_equivalent; dynamic sampling judges by this


class PromptStream:
    """Endless shuffled passes over the prompts, with a position that checkpoints can restore."""

    def __init__(self, prompts: list[Any], seed: int):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[Any]:
        out = []
        for _ in range(count):
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)


class RolloutCollector:
    """Generates and scores rounds of B prompts until the dynamic sampler holds B informative groups."""

    def __init__(self, config: Config, engine: RolloutEngine, tokenizer: Any, reward_fn: Callable[..., Any],
                 prompts: list[EncodedPrompt], dist: DistContext):
        self.cfg = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.dist = dist
        self.stream = PromptStream(prompts, config.seed)
        ds = config.dynamic_sampling
        self.sampler: DynamicSampler[ScoredGroup] = DynamicSampler(
            groups_per_step=config.prompts_per_step, enabled=ds.enabled, max_rounds=ds.max_rounds,
            on_exhausted=ds.on_exhausted, surplus=ds.surplus,
        )
        self.sampling = SamplingParams(
            temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
            max_new_tokens=config.rollout.max_response_length, stop_token_ids=tuple(config.rollout.stop_token_ids),
        )

    def score(self, prompts: list[EncodedPrompt], groups: list[list[Sample]]) -> tuple[list[ScoredGroup], int]:
        """Rule-based reward + soft overlong penalty for every sample; returns the groups and the
        number of reward calls that failed (raised or timed out: scored as incorrect)."""
        flat = [(prompt, sample) for prompt, group in zip(prompts, groups) for sample in group]
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat]
        results = score_responses(self.reward_fn, texts, [p.example.answer for p, _ in flat],
                                  [dict(p.example.metadata) for p, _ in flat], self.cfg.reward.timeout_s)
        scores = torch.tensor([r.score for r in results], dtype=torch.float64)
        if self.cfg.overlong.soft_punishment:
            lengths = torch.tensor([len(s.response_ids) for _, s in flat])
            scores = scores + soft_overlong_penalty(lengths, self.cfg.rollout.max_response_length, self.cfg.overlong.cache_length).double()
        g = self.cfg.group_size
        scored = [ScoredGroup(prompt=prompts[i], samples=groups[i], scores=scores[i * g : (i + 1) * g].tolist(),
                              correct=[r.correct for r in results[i * g : (i + 1) * g]]) for i in range(len(prompts))]
        return scored, sum(r.failed for r in results)

    def collect(self, step: int) -> tuple[list[ScoredGroup], dict[str, float]]:
        """This step's training groups (step = the 0-based index of the step being collected),
        and the rollout metrics. The caller holds the model's full parameters (FSDP2)."""
        cfg, dist = self.cfg, self.dist
        self.sampler.start_step()
        generated: list[ScoredGroup] = []
        gen_time = score_time = 0.0
        failures = 0
        while self.sampler.needs_more():
            prompts = self.stream.take(cfg.prompts_per_step)  # the same on every rank
            mine = prompts[dist.rank :: dist.world_size]
            t0 = time.perf_counter()
            groups = self.engine.generate([list(p.ids) for p in mine], cfg.group_size, self.sampling) if mine else []
            t1 = time.perf_counter()
            scored, failed = self.score(mine, groups)
            score_time += time.perf_counter() - t1
            gen_time += t1 - t0
            if dist.enabled:  # every rank gets every group, in prompt order
                shares = dist.all_gather_objects((scored, failed))
                scored = [shares[i % dist.world_size][0][i // dist.world_size] for i in range(len(prompts))]
                failed = sum(share[1] for share in shares)
            failures += failed
            generated.extend(scored)
            self.sampler.add(scored, torch.tensor([s.correct for s in scored], dtype=torch.bool))
        batch = self.sampler.take()
        # Policy statistics come from everything generated this step (the trained batch is
        # biased toward 50% accuracy by dynamic sampling); a step fed only by carried surplus
        # reports its batch instead.
        seen = generated or batch.groups
        samples = [s for grp in seen for s in grp.samples]
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
        new_tokens = sum(len(s.response_ids) for grp in generated for s in grp.samples) / dist.world_size
        metrics = {
            "train/reward_mean": sum(sum(g.scores) for g in seen) / len(samples),
            "train/accuracy": sum(sum(g.correct) for g in seen) / len(samples),
            "train/response_length_mean": lengths.mean().item(),
            "train/response_length_max": lengths.max().item(),
            "train/truncated_frac": sum(s.truncated for s in samples) / len(samples),
            # Judged on every generated group, also when dynamic sampling is off (the sampler then
            # accepts all groups): how much of the batch carries a gradient signal is the point.
            "train/informative_group_frac": (informative_groups(torch.tensor([g.correct for g in generated], dtype=torch.bool)).sum().item()
                                             / len(generated)) if generated else 0.0,
            "train/generation_rounds": float(batch.rounds),
            "train/samples_generated": float(len(generated) * cfg.group_size),
            "train/batch_groups": float(len(batch.groups)),
            "train/reward_failures": float(failures),
            "time/generation_s": gen_time,
            "time/scoring_s": score_time,
            "perf/generation_tokens_per_s": new_tokens / gen_time if gen_time > 0 else 0.0,
        }
        if batch.exhausted:
            metrics["train/sampling_exhausted"] = 1.0
            tqdm.write(f"step {step + 1}: dynamic sampling found {len(batch.groups)} of "
                       f"{cfg.prompts_per_step} informative groups in {batch.rounds} rounds; training on those")
        return batch.groups, metrics
