"""The DAPO trainer: one loop, following the data flow of DESIGN.md.

Each step::

    prompts ─► rollout (G samples each) ─► reward (+ soft overlong penalty)
            ─► dynamic sampler (keep informative groups; more rounds until B; carry surplus)
            ─► advantages (per group) ─► old log-probs (skipped when exactly on-policy)
            ─► updates: B / mini_batch_size optimiser steps × ppo_epochs, each accumulated over
               micro-batches with one token-level normaliser for the whole mini-batch
            ─► metrics, evaluation, checkpoint

Choices made here, and why:

- Log-probs (old and new) and entropy are computed from ``logits / temperature``: the
  distribution the rollout sampled from, so the importance ratio is exactly 1 on-policy.
- A sample whose advantage is exactly zero (and no KL term) contributes nothing to the gradient:
  it is counted in the normaliser but gets no forward or backward pass. Truncated samples under
  overlong filtering contribute nothing at all. Entropy and clip statistics are therefore means
  over the tokens that were trained.
- Surplus groups carried to the next step were sampled by the previous weights. Their "old"
  log-probs are recomputed with the current weights (as verl does for every batch): the ratio
  anchors the trust region at the current policy.
- Prompts are left-padded and responses right-padded inside a micro-batch, so response token j
  sits at the same column in every row; position ids follow the attention mask.
- A non-finite loss or gradient norm skips the optimiser step, leaving the weights untouched.
"""

from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from dapo_rl.algorithm import (
    DynamicSampler,
    DynamicSamplingExhausted,
    aggregate_loss,
    broadcast_to_tokens,
    decoupled_clip_loss,
    group_advantages,
    informative_groups,
    kl_penalty,
    loss_normalizer,
    soft_overlong_penalty,
    token_entropy,
    token_logprobs,
)
from dapo_rl.config import Config
from dapo_rl.data.encoding import EncodedPrompt
from dapo_rl.evaluation import EvalResult, evaluate
from dapo_rl.models.llama import FlatResponses, is_plain_llama, response_logits
from dapo_rl.rewards import score_responses
from dapo_rl.rollout.base import RolloutEngine, Sample, SamplingParams
from dapo_rl.rollout.fast import has_sliding_layers
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

    def __init__(self, prompts: list[EncodedPrompt], seed: int):
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

    def take(self, count: int) -> list[EncodedPrompt]:
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


@dataclass
class PackedBatch:
    """Micro-batch tensors; per-token ones are response-aligned ``[batch, max_response_len]``."""

    input_ids: torch.Tensor  # [b, P + R] prompts left-padded, responses right-padded
    attention_mask: torch.Tensor  # [b, P + R]
    position_ids: torch.Tensor  # [b, P + R]
    response_ids: torch.Tensor  # [b, R]
    response_mask: torch.Tensor  # [b, R] 1 on real response tokens
    prompt_lengths: list[int] = field(default_factory=list)  # [b] real prompt tokens per row
    response_lengths: list[int] = field(default_factory=list)  # [b] real response tokens per row


def pack(samples: list[Sample], pad_id: int, device: torch.device) -> PackedBatch:
    """Left-pad prompts and right-pad responses into one ``[b, P + R]`` batch (P, R = widest in ``samples``)."""
    prompt_lengths = [len(s.prompt_ids) for s in samples]
    response_lengths = [len(s.response_ids) for s in samples]
    prompt_width = max(prompt_lengths)
    response_width = max(max(response_lengths), 1)
    # Built as Python rows and converted once: one tensor per row costs more than the copy here.
    rows = [[pad_id] * (prompt_width - p) + list(s.prompt_ids) + list(s.response_ids) + [pad_id] * (response_width - r)
            for s, p, r in zip(samples, prompt_lengths, response_lengths)]
    input_ids = torch.tensor(rows, dtype=torch.long)
    column = torch.arange(prompt_width + response_width)
    start = prompt_width - torch.tensor(prompt_lengths)
    end = prompt_width + torch.tensor(response_lengths)
    attention = ((column >= start[:, None]) & (column < end[:, None])).long()
    response_mask = (column[:response_width] < torch.tensor(response_lengths)[:, None]).float()
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    return PackedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=position_ids.to(device),
        response_ids=input_ids[:, prompt_width:].to(device),
        response_mask=response_mask.to(device),
        prompt_lengths=prompt_lengths,
        response_lengths=response_lengths,
    )


# Fixed cost of one extra forward/backward call (Python, kernel launches, small-matrix
# inefficiency), in padded tokens; it decides when splitting a micro-batch by length pays off.
_BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(prompt_lengths: list[int], response_lengths: list[int],
                   overhead_tokens: int = _BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split rows into groups that each pad only to their own widest prompt and response.

    One padded batch costs ``rows × (max prompt + max response)`` tokens of compute; with response
    lengths spread from 1 to L, most of it is padding. Rows sorted by length are cut where that
    saves more than ``overhead_tokens`` per extra group (exact dynamic programme over cut points).

    Returns:
        Lists of row indices, every row exactly once.
    """
    n = len(response_lengths)
    order = sorted(range(n), key=lambda i: (response_lengths[i], prompt_lengths[i]))
    if n > 512:  # keep the O(n²) search cheap; equal-size groups of sorted rows are nearly as good
        return [order[i : i + 64] for i in range(0, n, 64)]
    best = [0.0] + [math.inf] * n  # best[j]: cost of rows order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        max_p = max_r = 0
        for i in range(j - 1, -1, -1):  # group = order[i:j]
            row = order[i]
            max_p = max(max_p, prompt_lengths[row])
            max_r = max(max_r, response_lengths[row])
            cost = best[i] + overhead_tokens + (j - i) * (max_p + max_r)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _quantiles(values: torch.Tensor, prefix: str) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_p10": q[0].item(), f"{prefix}_p50": q[1].item(), f"{prefix}_p90": q[2].item()}


@dataclass
class _SharedPrompts:
    """The distinct prompts of a micro-batch, run once (see ``Trainer._shared_prompts``)."""

    prompt_of: torch.Tensor  # [b] which distinct prompt each row has
    last_logits: torch.Tensor  # [U, V] logits at each prompt's last token (predict response token 0)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [U, heads, P, head_dim]
    prompt_columns: slice  # the prompt columns of the packed batch that were run
    attention: torch.Tensor  # [U, P] 1 on each distinct prompt's real tokens (0 on left padding)


@dataclass
class TrainState:
    step: int = 0
    samples_generated_total: int = 0
    skipped_updates_total: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Runs DAPO (or any GRPO-family variant the config describes) on one process."""

    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        tokenizer: Any,
        train_prompts: list[EncodedPrompt],
        eval_prompts: list[EncodedPrompt] | None,
        reward_fn: Callable[..., Any],
        engine: RolloutEngine,
        *,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        log: Callable[[dict[str, float], int], None] | None = None,
        checkpoint_fn: Callable[["Trainer"], None] | None = None,
        dist: DistContext | None = None,
    ):
        self.cfg = config
        self.model = model
        self.tokenizer = tokenizer
        self.eval_prompts = eval_prompts
        self.reward_fn = reward_fn
        self.engine = engine
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.log = log or (lambda metrics, step: None)
        self.checkpoint_fn = checkpoint_fn
        self.dist = dist or DistContext()
        self.state = TrainState()
        self.stream = PromptStream(train_prompts, config.seed)
        ds = config.dynamic_sampling
        self.sampler: DynamicSampler[ScoredGroup] = DynamicSampler(
            groups_per_step=config.prompts_per_step, enabled=ds.enabled, max_rounds=ds.max_rounds,
            on_exhausted=ds.on_exhausted, surplus=ds.surplus,
        )
        self.sampling = SamplingParams(
            temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
            max_new_tokens=config.rollout.max_response_length, stop_token_ids=tuple(config.rollout.stop_token_ids),
        )
        self.updates_per_step = (config.prompts_per_step // config.mini_batch_size) * config.ppo_epochs
        self.reference = None
        if config.loss.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval()
            self.reference.requires_grad_(False)
            self.dist.wrap_frozen(self.reference)
        # Training forwards go through the DDP wrapper (or the FSDP2-sharded model); `model`
        # itself is what the rollout engine samples from and what gets saved.
        self.train_model = self.dist.wrap_policy(model)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps, weight_decay=config.optim.weight_decay,
            # One fused kernel instead of ~6 ops per parameter: 3-4x faster steps on CPU (FSDP2's
            # sharded DTensor parameters take the default implementation).
            fused=not self.dist.sharded,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.norm_constant = float(config.loss.norm_constant or config.rollout.max_response_length)
        # Skip forward/backward for samples that cannot change the gradient (tests turn this off to prove it).
        self.skip_inert_samples = True
        # Run each distinct prompt of a micro-batch once (tests turn this off to compare).
        self.share_prompt_forward = True

    # ------------------------------------------------------------------ schedule

    def _lr_factor(self, update: int) -> float:
        warmup = self.cfg.optim.warmup_updates
        if warmup > 0 and update < warmup:
            return (update + 1) / warmup
        if self.cfg.optim.schedule == "cosine":
            total = max(1, self.cfg.steps * self.updates_per_step - warmup)
            progress = min(1.0, (update - warmup) / total)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ rollout and reward

    def _score_groups(self, prompts: list[EncodedPrompt], groups: list[list[Sample]]) -> tuple[list[ScoredGroup], int]:
        flat = [(prompt, sample) for prompt, group in zip(prompts, groups) for sample in group]
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat]
        results = score_responses(
            self.reward_fn, texts, [p.example.answer for p, _ in flat],
            [dict(p.example.metadata) for p, _ in flat], self.cfg.reward.timeout_s,
        )
        scores = torch.tensor([r.score for r in results], dtype=torch.float64)
        if self.cfg.overlong.soft_punishment:
            lengths = torch.tensor([len(s.response_ids) for _, s in flat])
            scores = scores + soft_overlong_penalty(lengths, self.cfg.rollout.max_response_length, self.cfg.overlong.cache_length).double()
        g = self.cfg.group_size
        scored = [
            ScoredGroup(prompt=prompts[i], samples=groups[i], scores=scores[i * g : (i + 1) * g].tolist(),
                        correct=[r.correct for r in results[i * g : (i + 1) * g]])
            for i in range(len(prompts))
        ]
        return scored, sum(r.failed for r in results)

    def _generate_rounds(self) -> tuple[list[ScoredGroup], float, float, int]:
        """Generate and score rounds of B prompts until the sampler holds B informative groups."""
        cfg = self.cfg
        generated: list[ScoredGroup] = []
        gen_time = score_time = 0.0
        failures = 0
        while self.sampler.needs_more():
            prompts = self.stream.take(cfg.prompts_per_step)  # the same on every rank
            mine = prompts[self.dist.rank :: self.dist.world_size]
            t0 = time.perf_counter()
            groups = self.engine.generate([list(p.ids) for p in mine], cfg.group_size, self.sampling) if mine else []
            t1 = time.perf_counter()
            scored, failed = self._score_groups(mine, groups)
            score_time += time.perf_counter() - t1
            gen_time += t1 - t0
            if self.dist.enabled:  # every rank gets every group, in prompt order
                shares = self.dist.all_gather_objects((scored, failed))
                scored = [shares[i % self.dist.world_size][0][i // self.dist.world_size] for i in range(len(prompts))]
                failed = sum(share[1] for share in shares)
            failures += failed
            generated.extend(scored)
            self.sampler.add(scored, torch.tensor([s.correct for s in scored], dtype=torch.bool))
        return generated, gen_time, score_time, failures

    def _collect(self) -> tuple[list[ScoredGroup], dict[str, float]]:
        """This step's training groups, and the rollout metrics."""
        cfg = self.cfg
        self.sampler.start_step()
        with self.dist.gathered(self.model):  # FSDP2: full parameters for the engine, freed after
            generated, gen_time, score_time, failures = self._generate_rounds()
        batch = self.sampler.take()
        # Policy statistics come from everything generated this step (the trained batch is
        # biased toward 50% accuracy by dynamic sampling); a step fed only by carried surplus
        # reports its batch instead.
        seen = generated or batch.groups
        samples = [s for grp in seen for s in grp.samples]
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
        new_tokens = sum(len(s.response_ids) for grp in generated for s in grp.samples) / self.dist.world_size
        self.state.samples_generated_total += len(generated) * cfg.group_size
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
            "train/samples_generated_total": float(self.state.samples_generated_total),
            "train/batch_groups": float(len(batch.groups)),
            "train/reward_failures": float(failures),
            "time/generation_s": gen_time,
            "time/scoring_s": score_time,
            "perf/generation_tokens_per_s": new_tokens / gen_time if gen_time > 0 else 0.0,
        }
        if batch.exhausted:
            metrics["train/sampling_exhausted"] = 1.0
            tqdm.write(f"step {self.state.step + 1}: dynamic sampling found {len(batch.groups)} of "
                       f"{cfg.prompts_per_step} informative groups in {batch.rounds} rounds; training on those")
        return batch.groups, metrics

    # ------------------------------------------------------------------ policy update

    def _forward_logprobs(self, model: torch.nn.Module, packed: PackedBatch, with_entropy: bool):
        """Log-probs ``[b, R]`` (differentiable) and entropy ``[b, R]`` (detached, or None) of the response tokens.

        Both come from ``logits / temperature``. Rows that share a prompt (a group's G samples)
        share one forward of it (see :meth:`_shared_prompts`); for a plain Llama model in one
        process, all response tokens then run as one unpadded batch (:meth:`_flat_logprobs`).
        Otherwise rows run in length groups (see :func:`length_buckets`), each cut to its own
        widest prompt and response, so padding is not computed. Positions past a row's response
        are 0 and must be masked by ``response_mask``. Only the logits of response positions are
        materialised (``logits_to_keep``).
        """
        b, response_width = packed.response_ids.shape
        prompt_width = packed.input_ids.shape[1] - response_width
        temperature = self.cfg.rollout.temperature
        shared = self._shared_prompts(model, packed)
        if shared is not None and not self.dist.enabled and is_plain_llama(model):
            return self._flat_logprobs(model, packed, shared, with_entropy)
        # Under FSDP2 each forward is a collective, so every rank makes exactly one per micro-batch.
        if packed.response_lengths and b > 1 and not self.dist.sharded:
            # With shared prompts a group's cost is its response widths only.
            prompt_cost = [0] * b if shared is not None else packed.prompt_lengths
            groups = length_buckets(prompt_cost, packed.response_lengths)
        else:
            groups = [list(range(b))]
        logp_parts, entropy_parts = [], []
        for rows in groups:
            if len(groups) == 1:  # the whole batch, in its own order: no row gather, full width
                rows, index, max_p, max_r = list(range(b)), None, prompt_width, response_width
            else:
                index = torch.tensor(rows, device=packed.input_ids.device)
                max_p = max(packed.prompt_lengths[r] for r in rows)
                max_r = max(max(packed.response_lengths[r] for r in rows), 1)
            response_ids = packed.response_ids[:, :max_r] if index is None else packed.response_ids[index, :max_r]
            if shared is not None:
                logits = self._response_logits(model, packed, rows, max_r, shared)
            else:
                columns = slice(prompt_width - max_p, prompt_width + max_r)
                pick = (lambda t: t[:, columns]) if index is None else (lambda t: t[index, columns])
                with self._autocast():
                    out = model(input_ids=pick(packed.input_ids), attention_mask=pick(packed.attention_mask),
                                position_ids=pick(packed.position_ids), logits_to_keep=max_r + 1, use_cache=False)
                logits = out.logits[:, :-1]  # [rows, max_r, V]: position t predicts response token t
            logp = token_logprobs(logits, response_ids, temperature=temperature)
            logp_parts.append(torch.nn.functional.pad(logp, (0, response_width - max_r)))
            if with_entropy:
                with torch.no_grad():
                    entropy = token_entropy(logits.detach(), temperature=temperature)
                entropy_parts.append(torch.nn.functional.pad(entropy, (0, response_width - max_r)))
        if len(groups) == 1:
            return logp_parts[0], (entropy_parts[0] if with_entropy else None)
        # Back to the caller's row order: rows were concatenated group by group.
        inverse = torch.empty(b, dtype=torch.long)
        inverse[torch.tensor([r for rows in groups for r in rows])] = torch.arange(b)
        inverse = inverse.to(logp_parts[0].device)
        logp = torch.cat(logp_parts)[inverse]
        entropy = torch.cat(entropy_parts)[inverse] if with_entropy else None
        return logp, entropy

    def _shared_prompts(self, model: torch.nn.Module, packed: PackedBatch) -> _SharedPrompts | None:
        """One forward over the distinct prompts of the micro-batch, or None when nothing repeats.

        A group's G responses share their prompt, and the prompt's keys and values do not depend
        on the response (causal attention): computing them once per distinct prompt, then
        running each response on top of its prompt's cache, gives the same log-probs and
        gradients (to rounding: different matrix shapes) as G full forwards, for 1/G of the
        prompt compute. Off under FSDP2 (one forward per micro-batch) and for models with
        sliding-window layers (their caches evict).
        """
        b, response_width = packed.response_ids.shape
        config = getattr(getattr(model, "module", model), "config", None)  # under DDP, the wrapped model's
        if not self.share_prompt_forward or self.dist.sharded or b < 2 or config is None or has_sliding_layers(config):
            return None
        prompt_width = packed.input_ids.shape[1] - response_width
        keys = [tuple(row[prompt_width - length :]) for row, length in zip(packed.input_ids[:, :prompt_width].tolist(), packed.prompt_lengths)]
        slot: dict[tuple, int] = {}
        prompt_of = [slot.setdefault(key, len(slot)) for key in keys]
        if len(slot) == b:
            return None
        first = torch.tensor([prompt_of.index(u) for u in range(len(slot))], device=packed.input_ids.device)
        max_p = max(packed.prompt_lengths)
        columns = slice(prompt_width - max_p, prompt_width)
        with self._autocast():
            out = model(input_ids=packed.input_ids[first, columns], attention_mask=packed.attention_mask[first, columns],
                        position_ids=packed.position_ids[first, columns], logits_to_keep=1, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return _SharedPrompts(prompt_of=torch.tensor(prompt_of, device=packed.input_ids.device), last_logits=out.logits[:, -1],
                              kv=kv, prompt_columns=columns, attention=packed.attention_mask[first, columns])

    def _flat_logprobs(self, model: torch.nn.Module, packed: PackedBatch, shared: _SharedPrompts, with_entropy: bool):
        """:meth:`_forward_logprobs` with every response token of the micro-batch in one unpadded
        batch (:func:`dapo_rl.models.llama.response_logits`): the projections and MLPs compute no
        padding and run once per weight instead of once per length group; only attention runs
        per length group. Used for plain Llama models in a single process (a DDP or FSDP2 wrapper
        must see every forward through its own ``forward``)."""
        b, width = packed.response_ids.shape
        device = packed.response_ids.device
        flat = FlatResponses.build(length_buckets([0] * b, packed.response_lengths), packed.prompt_lengths,
                                   packed.response_lengths, device)
        row_of, step_of = flat.row_of, flat.step_of
        n = row_of.numel()
        tokens = packed.response_ids[row_of, step_of]
        with self._autocast():
            after = response_logits(model, shared.kv, shared.attention, shared.prompt_of, tokens, flat)  # [N, V]
        # Response token 0 is predicted by its prompt's last position, token t > 0 by token t - 1.
        source = torch.where(step_of == 0, n + shared.prompt_of[row_of], torch.arange(n, device=device) - 1)
        logits = torch.cat([after, shared.last_logits])[source]  # [N, V]
        temperature = self.cfg.rollout.temperature
        logp_flat = token_logprobs(logits, tokens, temperature=temperature)
        logp = logp_flat.new_zeros((b, width)).index_put((row_of, step_of), logp_flat)
        if not with_entropy:
            return logp, None
        with torch.no_grad():
            entropy_flat = token_entropy(logits.detach(), temperature=temperature)
        return logp, entropy_flat.new_zeros((b, width)).index_put((row_of, step_of), entropy_flat)

    def _response_logits(self, model: torch.nn.Module, packed: PackedBatch, rows: list[int], max_r: int,
                         shared: _SharedPrompts) -> torch.Tensor:
        """Logits ``[rows, max_r, V]`` predicting response tokens 0..max_r-1, the responses run on their prompts' caches."""
        from transformers import DynamicCache

        index = torch.tensor(rows, device=packed.input_ids.device)
        owner = shared.prompt_of[index]
        prompt_width = packed.input_ids.shape[1] - packed.response_ids.shape[1]
        cache = DynamicCache(ddp_cache_data=[(k[owner], v[owner]) for k, v in shared.kv])
        response = slice(prompt_width, prompt_width + max_r)
        mask = torch.cat([packed.attention_mask[index, shared.prompt_columns], packed.attention_mask[index, response]], dim=1)
        with self._autocast():
            out = model(input_ids=packed.response_ids[index, :max_r], attention_mask=mask,
                        position_ids=packed.position_ids[index, response], past_key_values=cache, use_cache=True)
        # The prompt's last position predicts response token 0; response position t predicts t + 1.
        return torch.cat([shared.last_logits[owner].unsqueeze(1), out.logits[:, : max_r - 1]], dim=1)

    @torch.no_grad()
    def _score_old(self, samples: list[Sample], model: torch.nn.Module, forwards: int, placeholder: Sample) -> list[torch.Tensor]:
        """Per-sample ``[len(response)]`` log-probs under ``model`` (one no-grad pass).

        ``forwards`` micro-batch forwards are made; those beyond ``samples`` run ``placeholder``
        and are discarded (FSDP2 ranks must make the same number of forwards).
        """
        out: list[torch.Tensor] = []
        mb = self.cfg.micro_batch_size
        for k in range(forwards):
            chunk = samples[k * mb : (k + 1) * mb] or [placeholder]
            packed = pack(chunk, self.tokenizer.pad_token_id, self.device)
            logp, _ = self._forward_logprobs(model, packed, with_entropy=False)
            if k * mb < len(samples):
                out.extend(logp[i, : len(s.response_ids)] for i, s in enumerate(chunk))
        return out

    def _micro_batches_per_rank(self, trainable: torch.Tensor, owner: torch.Tensor) -> list[int]:
        """Micro-batches each rank needs for its share of the ``trainable`` samples."""
        return [math.ceil(int((trainable & (owner == r)).sum()) / self.cfg.micro_batch_size) for r in range(self.dist.world_size)]

    def _placeholder_backward(self, sample: Sample, last: bool) -> None:
        """A zero-weight forward/backward that takes part in the gradient collectives for a rank
        with no micro-batch of its own left (it adds exactly zero to every gradient)."""
        with self.dist.no_sync(self.train_model, last):
            packed = pack([sample], self.tokenizer.pad_token_id, self.device)
            logp, _ = self._forward_logprobs(self.train_model, packed, with_entropy=False)
            (logp.sum() * 0.0).backward()

    def _update(self, groups: list[ScoredGroup]) -> dict[str, float]:
        cfg = self.cfg
        t_start = time.perf_counter()
        metrics: dict[str, float] = {}
        if not groups:
            return {"time/update_s": 0.0, "train/updates": 0.0}
        samples = [s for g in groups for s in g.samples]
        rewards = torch.tensor([g.scores for g in groups], dtype=torch.float32)
        advantages = group_advantages(rewards, norm_by_std=cfg.advantage.norm_by_std, eps=cfg.advantage.eps).reshape(-1)
        truncated = torch.tensor([s.truncated for s in samples])
        contributes = ~truncated if cfg.overlong.filter else torch.ones_like(truncated)
        # Needs forward/backward: contributes, and a non-zero advantage or a KL term.
        active = contributes & ((advantages != 0) | (cfg.loss.kl_coef > 0))
        if not self.skip_inert_samples:
            active = torch.ones_like(active)

        on_policy = self.updates_per_step == 1
        t_old = time.perf_counter()
        old_logp: list[torch.Tensor | None] = [None] * len(samples)
        ref_logp: list[torch.Tensor | None] = [None] * len(samples)
        # Every rank knows the whole batch, hence every rank's share (sample i is rank i mod W's):
        # they agree on how many forwards each pass makes without asking each other.
        owner = self.dist.owners(len(samples))
        mine = active & (owner == self.dist.rank)
        mine_idx = [i for i in range(len(samples)) if mine[i]]
        score_counts = self._micro_batches_per_rank(active, owner)
        score_forwards = max(score_counts) if self.dist.sharded else score_counts[self.dist.rank]
        if not on_policy and score_forwards:
            for i, lp in zip(mine_idx, self._score_old([samples[i] for i in mine_idx], self.model, score_forwards, samples[0])):
                old_logp[i] = lp
        if self.reference is not None and score_forwards:
            for i, lp in zip(mine_idx, self._score_old([samples[i] for i in mine_idx], self.reference, score_forwards, samples[0])):
                ref_logp[i] = lp
        old_time = time.perf_counter() - t_old

        # Fixed keys, so that ranks can add their sums up position by position.
        sums: dict[str, float] = dict.fromkeys(["clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "kl"], 0.0)
        token_count = 0.0
        entropy_sum = 0.0
        loss_total = 0.0
        grad_norms: list[float] = []
        skipped = 0
        high_probs: list[torch.Tensor] = []
        low_probs: list[torch.Tensor] = []
        trained_tokens = 0
        group_order = list(range(len(groups)))
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            random.Random(cfg.seed * 7919 + self.state.step * 31 + epoch).shuffle(group_order)
            for mb_start in range(0, len(groups), cfg.mini_batch_size):
                mini_groups = group_order[mb_start : mb_start + cfg.mini_batch_size]
                mini = [gi * cfg.group_size + j for gi in mini_groups for j in range(cfg.group_size)]
                # One normaliser for the whole mini-batch: every loss-contributing token (or sequence) counts,
                # including those of zero-advantage samples that are skipped below.
                mask_counts = torch.zeros(len(mini), max(len(samples[i].response_ids) for i in mini))
                for row, i in enumerate(mini):
                    if contributes[i]:
                        mask_counts[row, : len(samples[i].response_ids)] = 1
                normalizer = loss_normalizer(mask_counts, cfg.loss.agg_mode)
                todo = [i for i in mini if mine[i]]
                in_mini = torch.zeros_like(active)
                in_mini[mini] = True
                runs = self.dist.micro_batch_count(self._micro_batches_per_rank(active & in_mini, owner))
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for run in range(runs):
                    idx = todo[run * cfg.micro_batch_size : (run + 1) * cfg.micro_batch_size]
                    last = run == runs - 1
                    if not idx:  # this rank has no work left; the others' collectives need it
                        self._placeholder_backward(samples[mini[0]], last)
                        continue
                    with self.dist.no_sync(self.train_model, last):  # DDP all-reduces in the last backward only
                        packed = pack([samples[i] for i in idx], self.tokenizer.pad_token_id, self.device)
                        logp, entropy = self._forward_logprobs(self.train_model, packed, with_entropy=True)
                        # Loss mask: response tokens of samples that are not overlong-filtered.
                        mask = packed.response_mask * contributes[idx].to(packed.response_mask.dtype).to(self.device).unsqueeze(-1)
                        width = mask.shape[1]
                        if on_policy:
                            old = logp.detach()
                        else:
                            old = torch.stack([torch.nn.functional.pad(old_logp[i], (0, width - old_logp[i].numel())) for i in idx]).to(self.device)
                        adv = broadcast_to_tokens(advantages[idx].to(self.device), mask)
                        out = decoupled_clip_loss(logp, old, adv, mask, eps_low=cfg.clip.eps_low,
                                                  eps_high=cfg.clip.eps_high, dual_clip_c=cfg.clip.dual_clip_c)
                        per_token = out.per_token_loss
                        if self.reference is not None:
                            ref = torch.stack([torch.nn.functional.pad(ref_logp[i], (0, width - ref_logp[i].numel())) for i in idx]).to(self.device)
                            kl = kl_penalty(logp, ref, cfg.loss.kl_estimator) * mask
                            per_token = per_token + cfg.loss.kl_coef * kl
                            sums["kl"] = sums.get("kl", 0.0) + kl.detach().sum().item()
                        loss = aggregate_loss(per_token, mask, cfg.loss.agg_mode, normalizer=normalizer, norm_constant=self.norm_constant)
                        loss.backward()
                    step_loss += loss.item()
                    for key, value in out.token_sums(mask).items():
                        sums[key] = sums.get(key, 0.0) + value.item()
                    token_count += mask.sum().item()
                    entropy_sum += (entropy * mask).sum().item()
                    old_prob = old.detach().exp()
                    high_probs.append(old_prob[out.clipped_high].float().cpu())
                    low_probs.append(old_prob[out.clipped_low].float().cpu())
                trained_tokens += sum(len(samples[i].response_ids) for i in todo)
                if self.dist.enabled:  # the gradients were summed over ranks in the last backward
                    step_loss = self.dist.all_reduce_sum([step_loss], self.device)[0]
                params = [p for p in self.model.parameters() if p.grad is not None]
                if params:
                    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                    norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP2
                else:
                    grad_norm = 0.0
                if not (math.isfinite(grad_norm) and math.isfinite(step_loss)):
                    skipped += 1  # weights untouched: drop this update's gradients
                    self.optimizer.zero_grad(set_to_none=True)
                    tqdm.write(f"step {self.state.step + 1}: non-finite loss or gradient; update skipped")
                else:
                    self.optimizer.step()
                    grad_norms.append(grad_norm)
                    loss_total += step_loss
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_updates_total += skipped
        if self.dist.enabled:  # statistics over the global batch
            keys = sorted(sums)
            totals = self.dist.all_reduce_sum([token_count, entropy_sum, float(trained_tokens)] + [sums[k] for k in keys], self.device)
            token_count, entropy_sum, trained_tokens = totals[0], totals[1], totals[2]
            sums = dict(zip(keys, totals[3:]))
            high_probs = [p for share in self.dist.all_gather_objects(high_probs) for p in share]
            low_probs = [p for share in self.dist.all_gather_objects(low_probs) for p in share]
        denom = max(token_count, 1.0)
        metrics.update({
            "train/loss": loss_total / max(1, self.updates_per_step - skipped),
            "train/entropy": entropy_sum / denom,
            "train/clip_frac_low": sums.get("clip_frac_low", 0.0) / denom,
            "train/clip_frac_high": sums.get("clip_frac_high", 0.0) / denom,
            "train/dual_clip_frac": sums.get("dual_clip_frac", 0.0) / denom,
            "train/ratio_mean": sums.get("ratio_mean", 0.0) / denom if token_count else 1.0,
            "train/approx_kl": sums.get("approx_kl", 0.0) / denom,
            "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/updates": float(self.updates_per_step - skipped),
            "train/skipped_updates": float(skipped),
            "train/advantage_zero_frac": float((advantages == 0).float().mean().item()),
            "time/old_logprob_s": old_time,
            "time/update_s": time.perf_counter() - t_start,
            "perf/train_tokens_per_s": trained_tokens * cfg.ppo_epochs / max(time.perf_counter() - t_start, 1e-9),
        })
        if self.reference is not None:
            metrics["train/kl"] = sums.get("kl", 0.0) / denom
        metrics.update(_quantiles(torch.cat(high_probs) if high_probs else torch.empty(0), "diag/clip_high_old_prob"))
        metrics.update(_quantiles(torch.cat(low_probs) if low_probs else torch.empty(0), "diag/clip_low_old_prob"))
        return metrics

    # ------------------------------------------------------------------ evaluation and loop

    def evaluate(self) -> EvalResult | None:
        """Held-out evaluation, on the main rank; other ranks get None.

        Every rank must call it together: under FSDP2 the parameters are gathered for it.
        """
        if not self.eval_prompts:
            return None
        with self.dist.gathered(self.model):
            if not self.dist.is_main:
                return None
            ec = self.cfg.eval
            params = SamplingParams(temperature=ec.temperature, top_p=ec.top_p, max_new_tokens=self.cfg.rollout.max_response_length,
                                    stop_token_ids=tuple(self.cfg.rollout.stop_token_ids))
            return evaluate(self.engine, self.eval_prompts, self.tokenizer, self.reward_fn, params=params,
                            samples_per_problem=ec.samples_per_prompt, greedy=ec.greedy, reward_timeout_s=self.cfg.reward.timeout_s)

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        groups, metrics = self._collect()
        metrics.update(self._update(groups))
        with self.dist.gathered(self.model):
            self.engine.sync_weights(self.model)
        self.state.step += 1
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def steps(self, should_stop: Callable[[], bool] | None = None) -> Iterator[dict[str, float]]:
        """Run the remaining steps, yielding each step's metrics (evaluation included when due).

        Args:
            should_stop: polled before each step (e.g. a signal handler's flag). When it returns
                True the loop saves a checkpoint of the finished steps, unless one was just saved,
                and ends early; the caller tells an early end from ``state.step < cfg.steps``.

        Raises:
            DynamicSamplingExhausted: the sampler ran out of rounds under ``on_exhausted=error``.
                A checkpoint is saved first, holding the groups found so far, so that resuming
                with more rounds loses none of the generation work.
        """
        cfg = self.cfg
        while self.state.step < cfg.steps:
            if should_stop is not None and should_stop():
                if self.checkpoint_fn is not None and getattr(self, "checkpointed_step", None) != self.state.step:
                    self.checkpoint_fn(self)
                return
            try:
                metrics = self.train_step()
            except DynamicSamplingExhausted:
                if self.checkpoint_fn is not None:
                    self.checkpoint_fn(self)
                raise
            step = self.state.step
            # Evaluation runs on the main rank only: it is the one that logs.
            if self.eval_prompts and ((cfg.eval.interval and step % cfg.eval.interval == 0) or step == cfg.steps):
                result = self.evaluate()
                if result is not None:
                    metrics.update(result.metrics())
            self.state.history.append({"step": step, **metrics})
            self.log(metrics, step)
            if self.checkpoint_fn is not None and ((cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.steps):
                self.checkpoint_fn(self)
            yield metrics
