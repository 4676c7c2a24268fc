"""Evaluate a policy on a set of prompts: avg@k, pass@k, greedy accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

from dapo_rl.data.encoding import EncodedPrompt
from dapo_rl.evaluation.metrics import avg_at_k, mean_pass_at_k
from dapo_rl.rewards import score_responses
from dapo_rl.rollout.base import RolloutEngine, SamplingParams
from dapo_rl.rollout.multi_turn import MultiTurnSampler, environment_result, last_model_turn, trajectory_metrics


@dataclass
class EvalResult:
    num_problems: int
    samples_per_problem: int
    avg_at_k: float  # mean accuracy over all samples ("accuracy" in the logs)
    pass_at_k: dict[int, float]  # unbiased pass@k for k = 1, 2, 4, ... up to samples_per_problem
    greedy_accuracy: float | None
    response_length_mean: float
    truncated_frac: float
    correct_counts: list[int] = field(repr=False)
    trajectory: dict[str, float] = field(default_factory=dict)  # multi-turn: turns, tool calls, errors by kind (rollout/* names)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {
            f"{prefix}accuracy": self.avg_at_k,
            f"{prefix}response_length_mean": self.response_length_mean,
            f"{prefix}truncated_frac": self.truncated_frac,
        }
        out.update({f"{prefix}pass@{k}": v for k, v in self.pass_at_k.items()})
        if self.greedy_accuracy is not None:
            out[f"{prefix}greedy_accuracy"] = self.greedy_accuracy
        out.update({f"{prefix}{name.removeprefix('rollout/')}": v for name, v in self.trajectory.items()})
        return out


def _pass_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def evaluate(
    engine: RolloutEngine,
    prompts: list[EncodedPrompt],
    tokenizer,
    reward_fn,
    *,
    params: SamplingParams,
    samples_per_problem: int,
    greedy: bool = False,
    reward_timeout_s: float = 5.0,
    multi_turn: MultiTurnSampler | None = None,
    rewards: tuple[float, float] = (1.0, -1.0),
) -> EvalResult:
    """Sample ``samples_per_problem`` responses per prompt at ``params`` and score them.

    ``multi_turn``: sample trajectories with tools or an environment instead (judged on the model's
    last turn, or by the environment's reward; ``rewards`` = (correct, incorrect) sets its threshold).
    """
    def sample(n: int, sampling: SamplingParams):
        if multi_turn is None:
            return engine.generate([list(p.ids) for p in prompts], n, sampling)
        return multi_turn.generate_for(prompts, n, sampling)

    def score(samples, truths, metas):
        texts = [tokenizer.decode(last_model_turn(s), skip_special_tokens=True) for s in samples]
        results = score_responses(reward_fn, texts, truths, metas, reward_timeout_s)
        return [environment_result(s.trajectory, r, *rewards) for s, r in zip(samples, results)]

    groups = sample(samples_per_problem, params)
    samples, truths, metas, lengths, truncated = [], [], [], [], []
    for prompt, group in zip(prompts, groups):
        for sample_ in group:
            samples.append(sample_)
            truths.append(prompt.example.answer)
            metas.append(dict(prompt.example.metadata))
            lengths.append(len(sample_.response_ids))
            truncated.append(sample_.truncated)
    results = score(samples, truths, metas)
    k = samples_per_problem
    counts = [sum(r.correct for r in results[i * k : (i + 1) * k]) for i in range(len(prompts))]
    greedy_acc = None
    if greedy:
        greedy_params = SamplingParams(temperature=0.0, max_new_tokens=params.max_new_tokens, stop_token_ids=params.stop_token_ids)
        greedy_groups = sample(1, greedy_params)
        greedy_results = score([g[0] for g in greedy_groups], [p.example.answer for p in prompts],
                               [dict(p.example.metadata) for p in prompts])
        greedy_acc = sum(r.correct for r in greedy_results) / len(prompts)
    return EvalResult(
        num_problems=len(prompts),
        samples_per_problem=k,
        avg_at_k=avg_at_k(counts, k),
        pass_at_k={j: mean_pass_at_k(counts, k, j) for j in _pass_ks(k)},
        greedy_accuracy=greedy_acc,
        response_length_mean=sum(lengths) / len(lengths),
        truncated_frac=sum(truncated) / len(truncated),
        correct_counts=counts,
        trajectory=trajectory_metrics(samples),
    )
