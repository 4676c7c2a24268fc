"""Reward functions in TRL's signature, summed with weights: ``reward.functions`` /
``reward.weights`` (TRL ``reward_funcs`` / ``reward_weights``), and ``DAPOTrainer(reward_funcs=...)``.

A function is called once per scoring batch (all responses of a generation round)::

    fn(prompts: list[str | list[dict]], completions: list[str], completion_ids: list[list[int]],
       **columns: list) -> list[float | None]

``prompts`` are the prompts as the dataset gave them (text or chat messages); ``columns`` are the
dataset's other columns, one value per response (the answer column included, under its name).
``None`` means "not applicable to this response": the weighted sum skips it, as TRL's ``nansum``.
An ``async def`` function is awaited, all async ones concurrently (``asyncio.gather``) on an event
loop of their own thread (so a notebook's running loop is no obstacle); plain ones run in order.

What a response scores, and how it differs from TRL:

- ``score`` = Σ weight_i · reward_i over the functions that returned a number; ``correct`` =
  ``score > 0`` (dynamic sampling's ``accuracy`` criterion reads it; with shaped rewards use
  ``dynamic_sampling.criterion=reward_std``).
- Each function's own value is a metric (``reward/<function name>`` in metrics.jsonl, the mean over
  the responses it applied to; TRL ``rewards/<name>/mean``).
- A function that raises, runs past ``timeout_s`` or returns the wrong number of values fails the
  whole batch (every response scores as a failed verification, counted in
  ``train/reward_failures`` and warned about once): the run goes on, where TRL would stop. A
  response for which every function returned ``None`` fails the same way (TRL gives it zero advantage).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dapo_rl.algorithm.registry import import_path

from .functions import RewardResult

__all__ = ["RewardFunctions", "function_name", "is_async_function"]

# Metadata keys the dataset loader adds (where the row came from): not the dataset's columns.
_LOADER_KEYS = ("source_path", "source_row")


def function_name(fn: Callable[..., Any]) -> str:
    """The name a reward function is logged under (TRL: ``__name__``)."""
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def is_async_function(fn: Callable[..., Any]) -> bool:
    """``async def`` functions and objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class _Failure(Exception):
    """One function's call that cannot give rewards; the message says why."""


def _call_in_thread(fn: Callable[[], Any], timeout_s: float | None) -> Any:
    """``fn()`` in a daemon thread, abandoned (it cannot be killed) past ``timeout_s``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported as the batch's failure
            box["error"] = exc

    thread = threading.Thread(target=run, name="reward-function", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _Failure(f"did not return within {timeout_s:g} s")
    if "error" in box:
        raise _Failure(f"raised {type(box['error']).__name__}: {str(box['error'])[:300]}")
    return box["value"]


class RewardFunctions:
    """Several TRL-signature reward functions, weighted, as one batch reward of
    :func:`~dapo_rl.rewards.functions.score_responses` (see the module docstring).

    Args:
        functions: the callables, or ``pkg.module:function`` paths.
        weights: one per function (TRL ``reward_weights``); ``None`` = all 1.
        answer_column: the dataset column of the ground truth; it reaches the functions under this name.
        incorrect_reward: the score of a failed response (``reward.incorrect``).
    """

    reads_samples = True  # score_responses passes prompts and completion_ids

    def __init__(self, functions: Sequence[Callable[..., Any] | str], weights: Sequence[float] | None = None, *,
                 answer_column: str = "answer", incorrect_reward: float = -1.0):
        self.functions = [import_path(f, "reward function") if isinstance(f, str) else f for f in functions]
        for fn in self.functions:
            if not callable(fn):
                raise ValueError(f"reward function {fn!r} is a {type(fn).__name__}, not a callable; give a function "
                                 f"fn(prompts, completions, completion_ids, **columns) -> list[float | None]")
        if not self.functions:
            raise ValueError("no reward function given; give at least one")
        self.weights = [1.0] * len(self.functions) if not weights else [float(w) for w in weights]
        if len(self.weights) != len(self.functions):
            raise ValueError(f"{len(self.weights)} weights for {len(self.functions)} reward functions; give one weight per function")
        names = [function_name(fn) for fn in self.functions]
        # Two functions of one name (two lambdas) are logged apart.
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.name = "+".join(self.names)
        self.answer_column = answer_column
        self.correct_reward = 1.0
        self.incorrect_reward = incorrect_reward

    def __call__(self, response: str, ground_truth: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """One response (without prompt or ids): the protocol of :mod:`dapo_rl.rewards.functions`."""
        result = self.score_batch([response], [ground_truth], [metadata])[0]
        if result.failed:
            raise ValueError(result.error)
        return {"score": result.score, "correct": result.correct, **result.metrics}

    def columns(self, ground_truths: Sequence[str], metadatas: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        """The dataset's columns, one value per response (``None`` where a row lacks one)."""
        keys = dict.fromkeys(k for m in metadatas for k in m if k not in _LOADER_KEYS)
        columns = {k: [m.get(k) for m in metadatas] for k in keys}
        columns.setdefault(self.answer_column, list(ground_truths))
        return columns

    def _outputs(self, kwargs: dict[str, Any], n: int, timeout_s: float | None) -> list[list[Any]]:
        """Every function's list of n values; raises :class:`_Failure` naming the function."""
        outputs: list[Any] = [None] * len(self.functions)
        waiting = [i for i, fn in enumerate(self.functions) if is_async_function(fn)]
        for i, fn in enumerate(self.functions):
            if i not in waiting:
                try:
                    outputs[i] = _call_in_thread(lambda fn=fn: fn(**kwargs), timeout_s)
                except _Failure as exc:
                    raise _Failure(f"{self.names[i]} {exc}") from None
        if waiting:
            async def gather() -> list[Any]:
                calls = [asyncio.wait_for(self.functions[i](**kwargs), timeout_s) for i in waiting]
                return await asyncio.gather(*calls, return_exceptions=True)

            # A loop of its own, in a thread of its own: the caller may be inside a running loop (a notebook).
            with ThreadPoolExecutor(1) as pool:
                for i, value in zip(waiting, pool.submit(asyncio.run, gather()).result()):
                    if isinstance(value, asyncio.TimeoutError):
                        raise _Failure(f"{self.names[i]} did not return within {timeout_s:g} s")
                    if isinstance(value, BaseException):
                        raise _Failure(f"{self.names[i]} raised {type(value).__name__}: {str(value)[:300]}")
                    outputs[i] = value
        for name, values in zip(self.names, outputs):
            if not isinstance(values, (list, tuple)) or len(values) != n:
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
                raise _Failure(f"{name} returned {got} for {n} completions; return a list with one float (or None) per completion")
            for v in values:
                if v is not None and (isinstance(v, (str, bytes)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v))):
                    raise _Failure(f"{name} returned {v!r}; each value must be a finite number or None (not applicable)")
        return outputs

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str], metadatas: Sequence[dict[str, Any]] | None = None,
                    timeout_s: float | None = None, *, prompts: Sequence[Any] | None = None,
                    completion_ids: Sequence[Sequence[int]] | None = None) -> list[RewardResult]:
        """One :class:`RewardResult` per response; ``timeout_s`` bounds each function's call."""
        n = len(responses)
        metas = list(metadatas) if metadatas is not None else [{} for _ in range(n)]
        kwargs = {"prompts": list(prompts) if prompts is not None else [None] * n, "completions": list(responses),
                  "completion_ids": [list(ids) for ids in completion_ids] if completion_ids is not None else [None] * n,
                  **{k: v for k, v in self.columns(ground_truths, metas).items() if k not in ("prompts", "completions", "completion_ids")}}
        try:
            outputs = self._outputs(kwargs, n, timeout_s)
        except _Failure as exc:
            return [RewardResult(self.incorrect_reward, False, {}, failed=True, error=str(exc)) for _ in range(n)]
        results = []
        for j in range(n):
            values = {name: float(out[j]) for name, out in zip(self.names, outputs) if out[j] is not None}
            if not values:
                results.append(RewardResult(self.incorrect_reward, False, {}, failed=True,
                                            error="every reward function returned None (not applicable) for a completion"))
                continue
            score = sum(w * float(out[j]) for w, out in zip(self.weights, outputs) if out[j] is not None)
            results.append(RewardResult(score, score > 0, values))
        return results
