"""Rewards: answer extraction, bounded-time equivalence checking, reward functions, registry.

Typical use by the trainer::

    from dapo_rl.rewards import resolve_reward_fn, score_responses

    reward_fn = resolve_reward_fn("dapo", correct_reward=1.0, incorrect_reward=-1.0)
    results = score_responses(reward_fn, responses, ground_truths, metadatas, timeout_s=10.0)
    scores = [r.score for r in results]
    accuracy = [r.correct for r in results]     # dynamic sampling judges groups by this
    n_failed = sum(r.failed for r in results)   # log it

Lower-level pieces: :func:`extract_answer` / :func:`extract_ground_truth` (find the answer),
:func:`is_equivalent` / :func:`verify_batch` (compare answers, never longer than the timeout),
:func:`verifier_stats` (timeouts, errors and worker restarts for the logs).
"""

from .batch_functions import RewardFunctions
from .extract import ANSWER_STYLES, extract_answer, extract_boxed, extract_dapo, extract_ground_truth, extract_gsm8k
from .functions import (
    DEFAULT_REWARD_TIMEOUT_S,
    BatchRewardFn,
    MathReward,
    NamedReward,
    RewardFn,
    RewardFunctionWarning,
    RewardResult,
    coerce_reward_output,
    score_responses,
)
from .normalize import normalize_answer, parse_number
from .registry import REWARDS, available_rewards, register_reward, register_reward_factory, resolve_reward_fn
from .verify import (
    DEFAULT_TIMEOUT_S,
    VerifierStats,
    VerifyOutcome,
    configure_verifier,
    is_equivalent,
    reset_verifier_stats,
    shutdown_verifier,
    verifier_stats,
    verify_answer,
    verify_batch,
    warm_up,
)

__all__ = [
    "ANSWER_STYLES",
    "REWARDS",
    "DEFAULT_REWARD_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "BatchRewardFn",
    "MathReward",
    "NamedReward",
    "RewardFn",
    "RewardFunctionWarning",
    "RewardFunctions",
    "RewardResult",
    "VerifierStats",
    "VerifyOutcome",
    "available_rewards",
    "coerce_reward_output",
    "configure_verifier",
    "extract_answer",
    "extract_boxed",
    "extract_dapo",
    "extract_ground_truth",
    "extract_gsm8k",
    "is_equivalent",
    "normalize_answer",
    "parse_number",
    "register_reward",
    "register_reward_factory",
    "reset_verifier_stats",
    "resolve_reward_fn",
    "score_responses",
    "shutdown_verifier",
    "verifier_stats",
    "verify_answer",
    "verify_batch",
    "warm_up",
]
