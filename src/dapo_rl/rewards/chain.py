"""The reward of the built-in chain tasks (``builtin:chain``, ``builtin:chain-long``; the tasks
themselves are :mod:`dapo_rl.data.synthetic`).

A response writes running sums, then the answer after ``#`` (``3807#7``); only that answer counts.
Registered as the ``chain`` reward, which ``reward.function=auto`` picks on the built-in data.
"""

from __future__ import annotations

__all__ = ["chain_reward", "extract_chain_answer"]


def extract_chain_answer(response: str) -> str | None:
    """The digit after the last ``#``, or None when the response has none."""
    head, sep, tail = response.rpartition("#")
    if not sep or len(tail.strip()) != 1 or not tail.strip().isdigit():
        return None
    return tail.strip()


def chain_reward(response: str, ground_truth: str, metadata: dict) -> bool:
    """Correct when the digit after the last ``#`` equals the ground truth (reward.correct / reward.incorrect)."""
    return extract_chain_answer(response) == ground_truth.strip()
