"""The DAPO trainer: one loop, following the data flow of docs/architecture.md.

Each step::

    prompts ─► rollout (G samples each) ─► reward (+ soft overlong penalty)
            ─► dynamic sampler (keep informative groups; more rounds until B; carry surplus)
            ─► advantages (per group) ─► old log-probs (skipped when exactly on-policy)
            ─► updates: B / mini_batch_size optimiser steps × ppo_epochs, each accumulated over
               micro-batches with one token-level normaliser for the whole mini-batch
            ─► metrics, evaluation, checkpoint

Rollout collection lives in :mod:`dapo_rl.training.rollouts`, the forward in
:mod:`dapo_rl.training.logprobs`, rank balancing in :class:`DistContext`; :meth:`Trainer.update`
holds the algorithm's lines. The policy loss, advantage estimator and KL estimator are looked up
in the registries of :mod:`dapo_rl.algorithm` by the names the config gives; the trainer never
knows which ones it runs.

Choices made here, and why:

- A sample whose advantage is exactly zero (and no KL term) contributes nothing to the gradient:
  it is counted in the normaliser but gets no forward or backward pass. Truncated samples under
  overlong filtering contribute nothing at all. Entropy and clip statistics are therefore means
  over the tokens that were trained.
- Surplus groups carried to the next step were sampled by older weights. Their "old"
  log-probs are recomputed with the current weights (as verl does for every batch): the ratio
  anchors the trust region at the current policy; and since the samples came from π_rollout,
  not π_old, they are always reweighted by the rollout correction (``token_truncate`` when
  ``rollout_correction.mode`` is ``none``).
- π_old is the trainer's own forward at the start of the update. With exactly one optimiser
  update per step it equals π_θ at the first forward, so the pass is skipped and ``logp.detach()``
  stands in for it.
- A non-finite loss or gradient norm skips the optimiser step, leaving the weights untouched.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from dapo_rl.algorithm import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    DynamicSamplingExhausted,
    LossSettings,
    aggregate_loss,
    broadcast_to_tokens,
    is_batch_coupled,
    loss_normalizer,
    mismatch_metrics,
)
from dapo_rl.config import Config
from dapo_rl.data.encoding import EncodedPrompt
from dapo_rl.evaluation import EvalResult, evaluate
from dapo_rl.models.lora import adapters_disabled, has_adapters, is_adapter_parameter, to_model_names
from dapo_rl.reproducibility import rng_state, set_rng_state
from dapo_rl.rollout.base import EngineLost, RolloutEngine, Sample, SamplingParams
from dapo_rl.training.batching import PreparedBatch, pack, pad_rows, per_sample_rows, response_mask
from dapo_rl.training.compose import correction_mode, loss_settings
from dapo_rl.training.distributed import DistContext
from dapo_rl.training.logprobs import ForwardSettings, logprobs
from dapo_rl.training.rollouts import RolloutCollector, ScoredGroup
from dapo_rl.training.step_metrics import StepMetrics
from dapo_rl.tools import EnvironmentFailures
from dapo_rl.training.weight_sync import SyncCheck, WeightSyncError


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside the block, its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class TrainState:
    step: int = 0
    samples_generated_total: int = 0
    skipped_updates_total: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Runs DAPO (or any GRPO-family variant the config describes) on one process or one rank.

    ``share_prompts=False`` runs the full forward of every row instead of each distinct prompt
    once (same numbers to rounding; for comparisons and debugging a custom model).
    """

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
        share_prompts: bool = True,
    ):
        self.cfg = config
        self.model = model
        self.tokenizer = tokenizer
        self.eval_prompts = eval_prompts
        self.reward_fn = reward_fn
        self.engine = engine
        self.device = device
        self.log = log or (lambda metrics, step: None)
        self.checkpoint_fn = checkpoint_fn
        self.dist = dist or DistContext()
        self.state = TrainState()
        self.checkpointed_step: int | None = None  # the step of the last checkpoint saved or loaded
        self.rollouts = RolloutCollector(config, engine, tokenizer, reward_fn, train_prompts, self.dist)
        # The plug points, by the names the config gives.
        self.policy_loss = POLICY_LOSSES.get(config.loss.policy_loss)
        self.advantage_estimator = ADVANTAGE_ESTIMATORS.get(config.advantage.estimator)
        self.kl_estimator = KL_ESTIMATORS.get(config.loss.kl_estimator)
        self.loss_settings = loss_settings(config)  # per update, with a generator seeded for that update
        # Zero-advantage samples change the gradient when an entropy bonus or a loss that couples
        # the batch's tokens (its statistics count them) is on: then they are run too.
        self.runs_every_sample = config.loss.entropy_coef > 0 or is_batch_coupled(self.policy_loss)
        self.correction_mode = correction_mode(config, engine, autocast_dtype)
        self.rollout_correction = ROLLOUT_CORRECTIONS.get(self.correction_mode)
        self.corrects_rollouts = self.correction_mode != "none"
        self.norm_constant = float(config.loss.norm_constant or config.rollout.max_response_length)
        self.updates_per_step = (config.prompts_per_step // config.mini_batch_size) * config.ppo_epochs
        # Under FSDP2 every forward is a collective (one per micro-batch on every rank); a DDP or
        # FSDP2 wrapper must see each forward through its own `forward` (no flat path).
        self.forward = ForwardSettings(temperature=config.rollout.temperature, autocast_dtype=autocast_dtype,
                                       share_prompts=share_prompts, flat=not self.dist.enabled, one_forward=self.dist.sharded)
        # The KL reference: a frozen copy of the initial policy; with LoRA adapters, the policy
        # itself with its adapters switched off (the frozen base, no copy).
        self.reference = None
        if config.loss.kl_coef > 0:
            if has_adapters(model):
                self.reference = model
            else:
                self.reference = copy.deepcopy(model).eval()
                self.reference.requires_grad_(False)
                self.dist.wrap_frozen(self.reference)
        # Training forwards go through the DDP wrapper (or the FSDP2-sharded model); `model`
        # itself is what the rollout engine samples from and what gets saved.
        self.train_model = self.dist.wrap_policy(model)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps, weight_decay=config.optim.weight_decay,
            # One fused kernel for all parameters instead of several small ops per parameter, whose
            # overhead dominates a small model's step (FSDP2's sharded DTensor parameters take the default).
            fused=not self.dist.sharded,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.sync_check = None
        if config.rollout.verify_sync:
            # An fp32 in-process engine agrees with the trainer to ~1e-6, and so does an fp32
            # rollout server; bf16 (autocast, vLLM) does not.
            fp32 = autocast_dtype is None and engine.precision in (None, "float32")
            self.sync_check = SyncCheck(engine, list(train_prompts[0].ids), self._probe_logprobs,
                                        tolerance=1e-3 if fp32 else None)

    @property
    def stream(self):
        """The training prompts' order and position (checkpointed)."""
        return self.rollouts.stream

    @property
    def sampler(self):
        """The dynamic sampler, with its surplus groups (checkpointed)."""
        return self.rollouts.sampler

    @property
    def policy_version(self) -> int:
        """Optimiser updates applied so far (attempted minus skipped): the version that tags
        sampled groups, whose difference is a carried group's age."""
        return self.scheduler.last_epoch - self.state.skipped_updates_total

    def _lr_factor(self, update: int) -> float:
        warmup = self.cfg.optim.warmup_updates
        if warmup > 0 and update < warmup:
            return (update + 1) / warmup
        if self.cfg.optim.schedule == "cosine":
            total = max(1, self.cfg.steps * self.updates_per_step - warmup)
            progress = min(1.0, (update - warmup) / total)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    # ------------------------------------------------------------------ policy update

    def update(self, groups: list[ScoredGroup]) -> dict[str, float]:
        """The policy update of one step on ``groups``: ``updates_per_step`` optimiser steps."""
        cfg = self.cfg
        t_start = time.perf_counter()
        self.engine.release_memory()  # not held through the update
        if not groups:
            return {"time/update_s": 0.0, "train/updates": 0.0}
        batch = self.prepare(groups)
        stats, losses, grad_norms, skipped = StepMetrics(), [], [], 0
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            for mini in self._mini_batches(len(groups), epoch):
                # One normaliser for the whole mini-batch: every loss token (or sequence) counts,
                # including those of the zero-advantage samples that are never run.
                normalizer = loss_normalizer(batch.loss_mask(mini), cfg.loss.agg_mode)
                self.optimizer.zero_grad(set_to_none=True)
                settings = replace(self.loss_settings, generator=self._update_generator())
                step_loss = 0.0
                for idx in self.dist.balanced_micro_batches(batch.trainable_among(mini), cfg.micro_batch_size,
                                                            self._placeholder(batch.samples[mini[0]]), train_model=self.train_model):
                    step_loss += self._micro_batch(batch, idx, normalizer, stats, settings)
                step_loss = self.dist.all_reduce_sum([step_loss], self.device)[0]  # the whole mini-batch's loss
                grad_norm = self._optimizer_step(step_loss)
                if grad_norm is None:
                    skipped += 1
                else:
                    grad_norms.append(grad_norm)
                    losses.append(step_loss)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_updates_total += skipped
        stats.reduce(self.dist)
        elapsed = time.perf_counter() - t_start
        return {
            **self._mismatch_metrics(batch),
            "train/loss": sum(losses) / max(1, len(losses)),
            "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/updates": float(self.updates_per_step - skipped),
            "train/skipped_updates": float(skipped),
            "train/advantage_zero_frac": float((batch.advantages == 0).float().mean().item()),
            **stats.report(),
            "time/old_logprob_s": batch.old_logprob_seconds,
            "time/update_s": elapsed,
            "perf/train_tokens_per_s": stats.trained_tokens / max(elapsed, 1e-9),
        }

    def _update_generator(self) -> torch.Generator:
        """The generator a loss draws from (Clip-Cov) during the coming optimiser update: seeded by
        the run's seed, the update's index (checkpointed with the scheduler) and the rank, so the
        draws repeat exactly, across a resume too, and touch no other random stream."""
        update = self.scheduler.last_epoch
        return torch.Generator().manual_seed(((self.cfg.seed * 1_000_033 + update) * 65_537 + self.dist.rank) % 2**63)

    def _micro_batch(self, batch: PreparedBatch, idx: list[int], normalizer: torch.Tensor, stats: StepMetrics,
                     settings: LossSettings) -> float:
        """Forward, loss and backward of one micro-batch (samples ``idx``); returns its loss."""
        samples = batch.samples
        packed = pack([samples[i] for i in idx], self.tokenizer.pad_token_id, self.device)
        mask = batch.loss_mask(idx).to(self.device)
        entropy_coef = self.cfg.loss.entropy_coef
        logp, entropy = logprobs(self.train_model, packed, self.forward, with_entropy=True, entropy_grad=entropy_coef > 0)
        old = logp.detach() if batch.old_logp is None else pad_rows([batch.old_logp[i] for i in idx], mask.shape[1], self.device)
        if batch.old_logp is None and batch.rollout_logp is not None:  # on-policy: π_old is this forward
            batch.mismatch.extend(samples[i].at_model_tokens(old[row, : len(samples[i].response_ids)].cpu() - batch.rollout_logp[i])
                                  for row, i in enumerate(idx))
        adv = broadcast_to_tokens(batch.advantages[idx].to(self.device), mask)
        per_token, loss_metrics = self.policy_loss(logp, old, adv, mask, settings)
        if batch.weights:  # importance weights π_old/π_rollout on the policy-gradient term
            per_token = per_token * per_sample_rows(batch.weights, idx, samples, per_token)
        if batch.ref_logp is not None:
            kl = self.kl_estimator(logp, pad_rows([batch.ref_logp[i] for i in idx], mask.shape[1], self.device)) * mask
            per_token = per_token + self.cfg.loss.kl_coef * kl
            loss_metrics = {**loss_metrics, "kl": kl.detach().sum()}
        if entropy_coef > 0:  # the entropy bonus, aggregated with the loss and, like the KL, not importance-weighted
            per_token = per_token - entropy_coef * entropy
        loss = aggregate_loss(per_token, mask, self.cfg.loss.agg_mode, normalizer=normalizer, norm_constant=self.norm_constant)
        loss.backward()
        stats.add(mask, entropy.detach(), loss_metrics, old, sum(len(samples[i].response_ids) for i in idx))
        return loss.item()

    def prepare(self, groups: list[ScoredGroup]) -> PreparedBatch:
        """Everything the update needs before its first gradient: advantages, the overlong filter,
        which samples run, π_old (one no-grad pass, unless the update is exactly on-policy and
        uncorrected: then π_old is π_θ's first forward), the KL reference's log-probs and the
        rollout correction's weights and rejections.

        A correction needs π_old for every sample in the loss, before the normalisers: its
        rejections leave the normaliser too. Surplus groups carried from an earlier step were
        sampled by older weights: they are never treated as on-policy (corrected by the configured
        mode, ``token_truncate`` under ``none``).
        """
        samples = [s for g in groups for s in g.samples]
        model = {i: torch.tensor(s.model_mask, dtype=torch.float32) for i, s in enumerate(samples) if s.model_mask is not None}
        rewards = torch.tensor([g.scores for g in groups], dtype=torch.float32)
        advantages = self.advantage_estimator(rewards, eps=self.cfg.advantage.eps).reshape(-1)  # one per sample
        truncated = torch.tensor([s.truncated for s in samples])
        filtered = truncated if self.cfg.overlong.filter else torch.zeros_like(truncated)  # overlong filtering
        # A sample with zero advantage and no KL or entropy term cannot change the gradient (unless
        # the loss couples the batch's tokens): it counts in the normaliser, but is never run.
        trainable = ~filtered & ((advantages != 0) | (self.reference is not None) | self.runs_every_sample)
        # π_rollout: the sampler's own log-probs, when the engine reports them.
        rollout_logp = [torch.tensor(s.logprobs) for s in samples] if all(s.logprobs is not None for s in samples) else None
        started = time.perf_counter()
        version = self.policy_version
        carried = torch.tensor([g.policy_version < version for g in groups for _ in g.samples])
        corrected = rollout_logp is not None and (self.corrects_rollouts or bool(carried.any()))
        old_logp = self._logprobs_of(self.model, samples, ~filtered if corrected else trainable) if self.updates_per_step > 1 or corrected else None
        ref_logp = None
        if self.reference is not None:
            with adapters_disabled(self.reference) if self.reference is self.model else nullcontext():
                ref_logp = self._logprobs_of(self.reference, samples, trainable)
        old_seconds = time.perf_counter() - started
        weights, kept = self._correct(samples, old_logp, rollout_logp, carried, model) if corrected else ({}, {})
        mismatch = ([samples[i].at_model_tokens(old_logp[i].cpu() - rollout_logp[i]) for i in sorted(old_logp)]
                    if old_logp and rollout_logp else [])
        return PreparedBatch(samples, advantages, filtered, trainable, old_logp, ref_logp, rollout_logp, weights, kept,
                             model, mismatch, old_seconds)

    def _mismatch_metrics(self, batch: PreparedBatch) -> dict[str, float]:
        """π_old against π_rollout over every rank's samples, and the tokens the correction masked."""
        mismatch = [row for share in self.dist.all_gather_objects(batch.mismatch) for row in share]
        masked = float(sum(batch.samples[i].model_tokens - batch.kept[i].sum().item() for i in batch.kept))
        return mismatch_metrics(mismatch, self.correction_mode.startswith("sequence"), masked)

    def _correct(self, samples: list[Sample], old_logp: dict[int, torch.Tensor], rollout_logp: list[torch.Tensor],
                 carried: torch.Tensor, model: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The rollout correction of the samples with a π_old (under ``rollout_correction.mode=none``,
        of the ``carried`` ones only, by ``token_truncate``): per sample, the loss weights ``[len]``
        (this rank's samples) and the loss mask ``[len]`` (every rank's, for the global normalisers).
        Only model tokens (``model``: the multi-turn samples' masks) enter the weights."""
        correction = self.rollout_correction if self.corrects_rollouts else ROLLOUT_CORRECTIONS.get("token_truncate")
        rows = sorted(i for i in old_logp if self.corrects_rollouts or carried[i])
        weights: dict[int, torch.Tensor] = {}
        kept: dict[int, torch.Tensor] = {}
        if rows:
            lengths = [len(samples[i].response_ids) for i in rows]
            cpu = torch.device("cpu")
            old = pad_rows([old_logp[i].detach().cpu() for i in rows], max(lengths), cpu)
            sampled = pad_rows([rollout_logp[i].to(old.dtype) for i in rows], max(lengths), cpu)
            tokens = response_mask(lengths).to(old.dtype)
            if model:  # environment tokens are never weighted, nor in a sequence's geometric mean
                tokens = tokens * per_sample_rows(model, rows, samples, tokens)
            w, mask = correction(old, sampled, tokens, self.cfg.rollout_correction.cap)
            w = w * tokens  # no weight off the model's tokens (1 there, exactly: single turns are unchanged)
            weights = {i: w[r, :n] for r, (i, n) in enumerate(zip(rows, lengths))}
            kept = {i: mask[r, :n] for r, (i, n) in enumerate(zip(rows, lengths))}
        return weights, {i: m for share in self.dist.all_gather_objects(kept) for i, m in share.items()}

    def _mini_batches(self, num_groups: int, epoch: int) -> Iterator[list[int]]:
        """Sample indices of each mini-batch of one epoch: groups in a seeded shuffled order."""
        order = list(range(num_groups))
        random.Random(self.cfg.seed * 7919 + self.state.step * 31 + epoch).shuffle(order)
        g, m = self.cfg.group_size, self.cfg.mini_batch_size
        for start in range(0, num_groups, m):
            yield [gi * g + j for gi in order[start : start + m] for j in range(g)]

    def _optimizer_step(self, step_loss: float) -> float | None:
        """Clip the gradients and step; returns the gradient norm, or None when a non-finite loss
        or gradient skipped the step (weights untouched, gradients dropped). The gradients were
        summed over ranks in the last backward."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = 0.0
        if params:
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP2
        if not (math.isfinite(grad_norm) and math.isfinite(step_loss)):
            self.optimizer.zero_grad(set_to_none=True)
            tqdm.write(f"step {self.state.step + 1}: non-finite loss or gradient; update skipped")
            return None
        self.optimizer.step()
        return grad_norm

    @torch.no_grad()
    def _probe_logprobs(self, sample: Sample) -> torch.Tensor:
        """The policy's ``[len]`` log-probs of a greedy probe's tokens, at temperature 1 (see :class:`SyncCheck`)."""
        batch = pack([sample], self.tokenizer.pad_token_id, self.device)
        with _eval_mode(self.model):  # as the engine samples: no dropout (LoRA's included)
            return logprobs(self.model, batch, replace(self.forward, temperature=1.0))[0][0, : len(sample.response_ids)]

    def _placeholder(self, sample: Sample) -> Callable[[], None]:
        """A zero-weight forward/backward through the training model (see ``DistContext.balanced_micro_batches``)."""

        def run() -> None:
            logp, _ = logprobs(self.train_model, pack([sample], self.tokenizer.pad_token_id, self.device), self.forward)
            (logp.sum() * 0.0).backward()

        return run

    @torch.no_grad()
    def _logprobs_of(self, model: torch.nn.Module, samples: list[Sample], work: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-sample ``[len(response)]`` log-probs under ``model`` (π_old, or the KL reference) of
        this rank's samples where ``work`` is True: one no-grad pass."""
        out: dict[int, torch.Tensor] = {}

        def placeholder() -> None:  # FSDP2: this rank's forward is part of a collective
            logprobs(model, pack([samples[0]], self.tokenizer.pad_token_id, self.device), self.forward)

        with _eval_mode(model):  # π_old and the reference are the policies that sample: no dropout
            for idx in self.dist.balanced_micro_batches(work, self.cfg.micro_batch_size, placeholder):
                logp, _ = logprobs(model, pack([samples[i] for i in idx], self.tokenizer.pad_token_id, self.device), self.forward)
                out.update((i, logp[row, : len(samples[i].response_ids)]) for row, i in enumerate(idx))
        return out

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds: ``model`` (full, name-keyed weights; a LoRA run's adapters
        alone, its base being ``model.path``), the optimiser (full, name-keyed), scheduler, prompt
        stream, dynamic sampler (with its surplus groups), the train state, and per rank the RNG
        states and the round sent ahead (``rollout.async_steps=1``).

        Under ``torchrun`` every rank must call it: the state is gathered from the shards and ranks.
        """
        model_state = self.dist.full_model_state(self.model)
        if has_adapters(self.model):  # LoRA: the frozen base is the run's model.path; only adapters change
            model_state = {k: v for k, v in model_state.items() if is_adapter_parameter(k)}
        state = {
            "model": model_state,
            "state": self.state,
            "optimizer": self.dist.full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self.dist.all_gather_objects(rng_state()),  # one per rank
            "rollouts": self.dist.all_gather_objects(self.rollouts.state_dict()),  # one per rank
        }
        self.checkpointed_step = self.state.step
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``model`` as saved: adapter-file names are
        accepted) and push the weights to the engine. Every rank calls it; a rank the state has no
        RNG state for (the run grew) gets a fresh stream derived from the seed, the step and its
        rank, and one whose round sent ahead was another rank's samples it again.

        Raises:
            RuntimeError: the weights do not match the model.
        """
        adapted = has_adapters(self.model)
        weights = to_model_names(state["model"]) if adapted else state["model"]
        missing, unexpected = self.dist.load_full_model_state(self.model, weights)
        # Tied weights (lm_head = embeddings) are stored once; a LoRA state holds the adapters
        # alone (the base is model.path); anything else missing is corruption.
        missing = [m for m in missing if "lm_head" not in m and (is_adapter_parameter(m) or not adapted)]
        if missing or unexpected:
            raise RuntimeError(f"the checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.state = state["state"]
        self.dist.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.sampler.load_state_dict(state["sampler"])
        rounds_ahead = state.get("rollouts") or []
        same_ranks = len(rounds_ahead) == self.dist.world_size
        mine = rounds_ahead[self.dist.rank] if same_ranks else (rounds_ahead[0] if rounds_ahead else None)
        if mine and mine.get("pending") and not same_ranks:
            mine["pending"]["samples"] = None  # another rank layout: each rank samples its share again
        self.rollouts.load_state_dict(mine)
        if self.dist.rank < len(state["rng"]):
            set_rng_state(state["rng"][self.dist.rank])
        else:
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.state.step * 1009 + self.dist.rank)
        with self.full_parameters():
            self.engine.sync_weights(self.model)
        self.checkpointed_step = self.state.step

    # ------------------------------------------------------------------ evaluation and loop

    def evaluate(self) -> EvalResult | None:
        """Held-out evaluation, on the main rank; other ranks get None.

        Every rank must call it together: under FSDP2 the parameters are gathered for it.
        """
        if not self.eval_prompts:
            return None
        with self.full_parameters():
            if not self.dist.is_main:
                return None
            ec = self.cfg.eval
            params = SamplingParams(temperature=ec.temperature, top_p=ec.top_p, max_new_tokens=self.cfg.rollout.max_response_length,
                                    stop_token_ids=tuple(self.cfg.rollout.stop_token_ids))
            return evaluate(self.engine, self.eval_prompts, self.tokenizer, self.reward_fn, params=params,
                            samples_per_problem=ec.samples_per_prompt, greedy=ec.greedy, reward_timeout_s=self.cfg.reward.timeout_s,
                            multi_turn=self.rollouts.multi_turn, rewards=(self.cfg.reward.correct, self.cfg.reward.incorrect))

    @contextmanager
    def full_parameters(self) -> Iterator[None]:
        """The model's full parameters for the rollout engine (:meth:`DistContext.gathered`). Under
        FSDP2 resharding frees the gathered storage, which a decoder the engine keeps between calls
        reads: it is released with them (no reuse across gathers, and no stale or freed weights)."""
        with self.dist.gathered(self.model):
            try:
                yield
            finally:
                if self.dist.sharded:
                    self.engine.release_memory()

    def train_step(self) -> dict[str, float]:
        """Collect a batch of informative groups, update the policy on it, push the weights to the engine."""
        t0 = time.perf_counter()
        with self.full_parameters():  # FSDP2: full parameters for the engine, freed after
            if self.sync_check is not None:
                self.sync_check.before()
            groups, metrics = self.rollouts.collect(self.state.step, policy_version=self.policy_version)
        self.state.samples_generated_total += int(metrics["train/samples_generated"])
        metrics["train/samples_generated_total"] = float(self.state.samples_generated_total)
        metrics.update(self.update(groups))
        with self.full_parameters():
            # The step is complete before the push: a failed push or check still checkpoints it.
            self.state.step += 1
            self.engine.sync_weights(self.model)
            if self.sync_check is not None:
                metrics.update(self.sync_check.after())
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
            WeightSyncError: the engine did not take a weight push (``rollout.verify_sync``);
                the finished step is checkpointed first.
            EnvironmentFailures: ``rollout.max_environment_failures`` environments in a row raised;
                the finished steps are checkpointed first.
            EngineLost: the rollout engine stopped answering (a rollout server died); the
                finished steps are checkpointed first.
        """
        cfg = self.cfg
        while self.state.step < cfg.steps:
            if should_stop is not None and should_stop():
                if self.checkpoint_fn is not None and self.checkpointed_step != self.state.step:
                    self.checkpoint_fn(self)
                return
            try:
                metrics = self.train_step()
            except (DynamicSamplingExhausted, WeightSyncError, EngineLost, EnvironmentFailures):
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
