"""Evaluate a policy on a set of prompts: avg@k, pass@k, greedy accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

from dapo_rl.data.encoding import EncodedPrompt
from dapo_rl.evaluation.metrics import avg_at_k, mean_pass_at_k
from dapo_rl.rewards import score_responses
from dapo_rl.rollout.base import RolloutEngine, SamplingParams


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

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {
            f"{prefix}accuracy": self.avg_at_k,
            f"{prefix}response_length_mean": self.response_length_mean,
            f"{prefix}truncated_frac": self.truncated_frac,
        }
        out.update({f"{prefix}pass@{k}": v for k, v in self.pass_at_k.items()})
        if self.greedy_accuracy is not None:
            out[f"{prefix}greedy_accuracy"] = self.greedy_accuracy
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
) -> EvalResult:
    """Sample ``samples_per_problem`` responses per prompt at ``params`` and score them."""
    groups = engine.generate([list(p.ids) for p in prompts], samples_per_problem, params)
    responses, truths, metas, lengths, truncated = [], [], [], [], []
    for prompt, group in zip(prompts, groups):
        for sample in group:
            responses.append(tokenizer.decode(sample.response_ids, skip_special_tokens=True))
            truths.append(prompt.example.answer)
            metas.append(dict(prompt.example.metadata))
            lengths.append(len(sample.response_ids))
            truncated.append(sample.truncated)
    results = score_responses(reward_fn, responses, truths, metas, reward_timeout_s)
    k = samples_per_problem
    counts = [sum(r.correct for r in results[i * k : (i + 1) * k]) for i in range(len(prompts))]
    greedy_acc = None
    if greedy:
        greedy_params = SamplingParams(temperature=0.0, max_new_tokens=params.max_new_tokens, stop_token_ids=params.stop_token_ids)
        greedy_groups = engine.generate([list(p.ids) for p in prompts], 1, greedy_params)
        texts = [tokenizer.decode(g[0].response_ids, skip_special_tokens=True) for g in greedy_groups]
        greedy_results = score_responses(reward_fn, texts, [p.example.answer for p in prompts],
                                         [dict(p.example.metadata) for p in prompts], reward_timeout_s)
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
    )
