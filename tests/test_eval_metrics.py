"""pass@k and avg@k against values computed by hand."""

from __future__ import annotations

import itertools

import pytest

from dapo_rl.evaluation import avg_at_k, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
        (5, 0, 3, 0.0),  # nothing correct: no draw can succeed
        (5, 5, 1, 1.0),
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (6, 4, 3, 1.0),  # n - c = 2 < k = 3: every 3-subset holds a correct sample
        (8, 1, 8, 1.0),  # k = n: any correct sample is drawn
        (8, 0, 8, 0.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_grows_with_k():
    values = [pass_at_k(10, 2, k) for k in range(1, 11)]
    # strictly increasing while a k-subset can still miss both correct samples (k <= 8) ...
    assert all(a < b for a, b in itertools.pairwise(values[:9]))
    # ... and exactly 1 once it cannot (k = 9, 10: only 8 wrong samples exist)
    assert values[8] == values[9] == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k_is_mean_accuracy_over_all_samples():
    # 3 problems, 4 samples each: 1 + 4 + 0 correct of 12
    assert avg_at_k([1, 4, 0], 4) == pytest.approx(5 / 12)


def test_mean_pass_at_k_averages_problems():
    # problem 1: 1 - C(3,2)/C(4,2) = 0.5; problem 2: all correct = 1; problem 3: none = 0
    assert mean_pass_at_k([1, 4, 0], 4, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    assert mean_pass_at_k([1, 4, 0], 4, 1) == pytest.approx(avg_at_k([1, 4, 0], 4))


def test_empty_problem_set_is_an_error():
    with pytest.raises(ValueError):
        avg_at_k([], 4)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 4, 1)
