"""avg@k and the unbiased pass@k estimator."""

from __future__ import annotations

from math import comb
from typing import Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    The probability that at least one of ``k`` samples drawn without replacement from the
    ``n`` generated ones is correct.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got {num_correct} of {num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"need 1 <= k <= num_samples, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def avg_at_k(correct_counts: Sequence[int], num_samples: int) -> float:
    """Mean accuracy over all samples of all problems (``avg@k`` with k = num_samples)."""
    if not correct_counts:
        raise ValueError("avg@k of an empty set of problems is undefined")
    return sum(correct_counts) / (len(correct_counts) * num_samples)


def mean_pass_at_k(correct_counts: Sequence[int], num_samples: int, k: int) -> float:
    """pass@k averaged over problems."""
    if not correct_counts:
        raise ValueError("pass@k of an empty set of problems is undefined")
    return sum(pass_at_k(num_samples, c, k) for c in correct_counts) / len(correct_counts)
