"""After every weight push, check that the rollout engine really samples from the new weights.

A push that silently does nothing leaves the sampler on the initial policy while the trainer
believes it is on-policy (verl #7495). The check costs one short greedy generation of a fixed
probe prompt by the engine and one single-row forward of the trainer per step:

- after each push the engine decodes the probe greedily (no random numbers are drawn, so the
  run's samples are unchanged) and reports the log-prob of each token it chose;
- the trainer scores the same tokens with its new weights (``log softmax(logits)``, temperature
  1: greedy decoding reports the unscaled distribution);
- the engine is **stale** when the update moved the trainer's scores of the probe but the engine
  answers as the previous weights did: the same tokens with bit-identical log-probs (a
  deterministic engine on unchanged weights), or log-probs clearly closer (4×) to the trainer's
  previous-weight scores than to its new ones. The second rule is only applied when the update
  moved the scores by more than 4× the engine's own rounding (its gap to the trainer at the
  previous probe): a bf16 engine's rounding (~1e-3–1e-2 per token) can exceed what one small
  update moves, and then its answer lands nearer the old scores by chance about as often as
  nearer the new ones. Such an engine is judged by the first rule alone.
  An fp32 in-process engine must also agree with the new weights to ``tolerance`` (mean |Δ log p|).

The previous step's probe is kept, so each step runs the probe once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dapo_rl.rollout.base import RolloutEngine, Sample, SamplingParams
from dapo_rl.training.errors import RunError


MIN_MOVE = 1e-6  # mean |Δ log p| of the probe that an update must cause before staleness is judged


class WeightSyncError(RunError):
    """The engine did not take the pushed weights (exit 2)."""


@dataclass
class _Probe:
    response: list[int]
    engine_logp: torch.Tensor  # [L] what the engine reported
    trainer_logp: torch.Tensor  # [L] the trainer's log-probs of the same tokens, same weights


class SyncCheck:
    """``before()`` with the weights the engine holds, ``after()`` once the new ones are pushed."""

    def __init__(self, engine: RolloutEngine, prompt: list[int], score: Callable[[Sample], torch.Tensor],
                 tolerance: float | None, max_new_tokens: int = 8):
        """``score(sample)`` is the trainer's ``[len(response)]`` log-probs at temperature 1;
        ``tolerance``: the largest mean |Δ log p| a correctly synced engine shows (None: no
        absolute check, as for a bf16 engine)."""
        self.engine = engine
        self.prompt = list(prompt)
        self.score = score
        self.tolerance = tolerance
        self.params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        self.previous: _Probe | None = None

    def _probe(self) -> _Probe | None:
        sample = self.engine.generate([self.prompt], 1, self.params)[0][0]
        if sample.logprobs is None or not sample.response_ids:
            return None  # an engine without log-probs samples from the trainer's own module
        return _Probe(list(sample.response_ids), torch.tensor(sample.logprobs, dtype=torch.float64),
                      self.score(sample).detach().double().cpu())

    def before(self) -> None:
        """Probe with the weights the engine holds now (skipped when the last ``after`` did)."""
        if self.previous is None:
            self.previous = self._probe()

    def after(self) -> dict[str, float]:
        """Probe the pushed weights; returns ``rollout/sync_logp_abs_diff`` (engine vs trainer).

        Raises:
            WeightSyncError: the engine still samples from the previous weights, or (with a
                tolerance) disagrees with the new ones.
        """
        old, new = self.previous, self._probe()
        self.previous = new
        if new is None:
            return {}
        diff_new = (new.engine_logp - new.trainer_logp).abs().mean().item()
        name = type(self.engine).__name__
        if old is not None and old.response == new.response:
            moved = (new.trainer_logp - old.trainer_logp).abs().mean().item()
            diff_old = (new.engine_logp - old.trainer_logp).abs().mean().item()
            unchanged = torch.equal(new.engine_logp, old.engine_logp)
            rounding = (old.engine_logp - old.trainer_logp).abs().mean().item()
            closer_to_old = moved > 4 * rounding and 4 * diff_old < diff_new
            # Below ~1e-6 an update is within float32 rounding of the scores: nothing to tell apart.
            if moved > MIN_MOVE and (unchanged or closer_to_old):
                raise WeightSyncError(
                    f"rollout.engine: the {name} engine still samples from the previous weights after the weight push "
                    f"(probe log-probs {diff_old:.2e} from the old weights, {diff_new:.2e} from the new); the weight sync "
                    f"is broken, report it (rollout.verify_sync=false skips this check)")
        if self.tolerance is not None and diff_new > self.tolerance:
            raise WeightSyncError(
                f"rollout.engine: the {name} engine's probe log-probs differ from the trainer's new weights by "
                f"{diff_new:.2e} (tolerance {self.tolerance:.0e}) after the weight push; it is not sampling from them "
                f"(rollout.verify_sync=false skips this check)")
        return {"rollout/sync_logp_abs_diff": diff_new}
