"""Reward functions: the built-in answer checkers and safe scoring of any reward function.

**The reward-function protocol.** A reward function is any callable

    fn(response: str, ground_truth: str, metadata: dict) -> float | dict

returning either

* a number: the score. ``correct`` is then taken to be ``score > 0`` (so with the default
  +1/-1 rewards, and with 1/0 rewards, it means what it should); or
* a ``bool``: ``True``/``False`` become the configured correct/incorrect reward; or
* a dict with a ``"score"`` (number) and optionally ``"correct"`` (bool; default ``score > 0``).
  Every other entry whose value is a number is an extra metric the trainer logs (averaged over
  the batch); non-numeric entries are ignored.

**Safety.** The trainer never calls a reward function directly; it calls :func:`score_responses`,
which turns an exception, a hang past the timeout, or a malformed return value into a failed
result (``failed=True``, ``correct=False``, ``score`` = the incorrect reward) and warns once per
distinct error. One bad response can therefore never stop a training run.

A reward function may also offer a batch method, ``score_batch(responses, ground_truths,
metadatas, timeout_s) -> list[RewardResult]``; :func:`score_responses` then uses it instead of
one call per response. The built-ins do, so that a training step's symbolic checks run on the
verifier pool in parallel. A batch reward that sets ``reads_samples = True`` also gets, by keyword,
``prompts`` (each response's prompt as the dataset gave it) and ``completion_ids`` (its token ids),
when the caller has them (:class:`~dapo_rl.rewards.batch_functions.RewardFunctions`: TRL's signature).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .extract import ANSWER_STYLES, extract_answer, extract_ground_truth
from .normalize import normalize_answer
from .verify import DEFAULT_TIMEOUT_S, verify_batch

__all__ = [
    "DEFAULT_REWARD_TIMEOUT_S",
    "BatchRewardFn",
    "MathReward",
    "NamedReward",
    "RewardFn",
    "RewardFunctionWarning",
    "RewardResult",
    "coerce_reward_output",
    "score_responses",
]

logger = logging.getLogger(__name__)

#: Default time a reward function may take per response in :func:`score_responses`.
DEFAULT_REWARD_TIMEOUT_S = 10.0
# Threads of hung reward calls cannot be killed, only abandoned. Past this many still running,
# further calls are refused (and fail) instead of piling up threads without bound.
_MAX_ABANDONED_THREADS = 32
# Distinct warnings per reward function before they are summarised into one last warning.
_MAX_DISTINCT_WARNINGS = 20


class RewardFunctionWarning(RuntimeWarning):
    """A reward function raised, hung, or returned something that is not a reward."""


@runtime_checkable
class RewardFn(Protocol):
    """``fn(response, ground_truth, metadata) -> float | dict``; see the module docstring."""

    def __call__(self, response: str, ground_truth: str, metadata: dict[str, Any]) -> float | dict[str, Any]: ...


@runtime_checkable
class BatchRewardFn(RewardFn, Protocol):
    """A reward function that can also score a whole batch at once."""

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        timeout_s: float | None,
    ) -> list[RewardResult]: ...


@dataclass
class RewardResult:
    """The scored outcome of one response.

    Attributes:
        score: the reward (before any length shaping the trainer adds).
        correct: whether the response counts as solved; dynamic sampling and accuracy metrics use
            this, not the score.
        metrics: extra numeric values to log (e.g. ``answer_found``).
        failed: the reward could not be computed: the function raised, hung, or returned garbage,
            or the built-in verifier timed out. A failed result scores as incorrect.
        error: a short description of the failure, else ``None``.
    """

    score: float
    correct: bool
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    error: str | None = None


class _BadOutput(ValueError):
    """A reward function returned something that is not a reward."""


def _finite_float(value: Any, what: str) -> float:
    if isinstance(value, (str, bytes)) or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        raise _BadOutput(f"{what} is {type(value).__name__}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise _BadOutput(f"{what} cannot be converted to float: {exc}") from None
    if not math.isfinite(number):
        raise _BadOutput(f"{what} is {number}, not a finite number")
    return number


def _is_boolish(value: Any) -> bool:
    # numpy's bool is neither ``bool`` nor ``numbers.Integral``, but reward code returns it often.
    kind = type(value)
    return isinstance(value, (bool, numbers.Integral)) or (kind.__module__ == "numpy" and "bool" in kind.__name__)


def coerce_reward_output(output: Any, correct_reward: float = 1.0, incorrect_reward: float = -1.0) -> RewardResult:
    """Turn a reward function's return value into a :class:`RewardResult`.

    Follows the protocol in the module docstring.

    Raises:
        ValueError: ``output`` is not a number, a bool, or a dict with a numeric ``"score"``.
    """
    if isinstance(output, bool):
        return RewardResult(correct_reward if output else incorrect_reward, output)
    if isinstance(output, Mapping):
        if "score" not in output:
            keys = ", ".join(repr(k) for k in list(output)[:10])
            raise _BadOutput(f"returned a dict without a 'score' key (keys: {keys})")
        score = _finite_float(output["score"], "'score'")
        correct_value = output.get("correct")
        if correct_value is None:
            correct = score > 0
        elif _is_boolish(correct_value):
            correct = bool(correct_value)
        else:
            raise _BadOutput(f"'correct' is {type(correct_value).__name__}, not a bool")
        metrics: dict[str, float] = {}
        for key, value in output.items():
            if key in ("score", "correct") or not isinstance(key, str):
                continue
            if isinstance(value, bool):
                metrics[key] = float(value)
            elif isinstance(value, numbers.Real):
                number = float(value)
                if math.isfinite(number):
                    metrics[key] = number
        return RewardResult(score, correct, metrics)
    score = _finite_float(output, "the return value")
    return RewardResult(score, score > 0)


def _callable_name(fn: Any) -> str:
    return str(getattr(fn, "name", None) or getattr(fn, "__qualname__", None) or type(fn).__name__)


@dataclass
class NamedReward:
    """A user reward function with a name and the reward values used for bools and failures.

    :func:`~dapo_rl.rewards.registry.resolve_reward_fn` wraps import-path functions in this, so
    :func:`score_responses` knows what score a failure gets.
    """

    fn: Callable[..., Any]
    name: str
    correct_reward: float = 1.0
    incorrect_reward: float = -1.0

    def __call__(self, response: str, ground_truth: str, metadata: dict[str, Any]) -> float | dict[str, Any]:
        return self.fn(response, ground_truth, metadata)


@dataclass
class MathReward:
    """Built-in reward: extract the final answer, check it against the ground truth.

    Scores ``correct_reward`` when equivalent and ``incorrect_reward`` otherwise, including when
    no answer is found. Extra metrics: ``answer_found`` (format compliance) and
    ``verify_timeout`` (the symbolic check hit its timeout; the result is then also ``failed``).

    Args:
        style: where to look for the answer in a response (see
            :func:`~dapo_rl.rewards.extract.extract_answer`). Ground truths are always read with
            ``"auto"`` (``#### 72``, ``\\boxed{72}`` and plain ``72`` all work).
        correct_reward: score of a correct response.
        incorrect_reward: score of a wrong one (and of a failed check).
        timeout_s: per-check bound for the symbolic verifier when none is given by the caller.
        symbolic: ``False`` compares normalised strings only (the ``"exact"`` reward).
        name: the registry name, for logs.
    """

    style: str = "auto"
    correct_reward: float = 1.0
    incorrect_reward: float = -1.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    symbolic: bool = True
    name: str = "math"

    def __post_init__(self) -> None:
        if self.style not in ANSWER_STYLES:
            raise ValueError(f"Unknown answer style {self.style!r}; expected one of {', '.join(ANSWER_STYLES)}.")

    def __call__(self, response: str, ground_truth: str, metadata: dict[str, Any]) -> dict[str, Any]:
        result = self.score_batch([response], [ground_truth], [metadata])[0]
        return {"score": result.score, "correct": result.correct, **result.metrics}

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        metadatas: Sequence[dict[str, Any]] | None = None,
        timeout_s: float | None = None,
    ) -> list[RewardResult]:
        """Score many responses at once; symbolic checks share the verifier pool in parallel."""
        answers = [extract_answer(r, self.style) if isinstance(r, str) else None for r in responses]
        truths = [extract_ground_truth(g) if isinstance(g, str) else "" for g in ground_truths]
        todo = [i for i, answer in enumerate(answers) if answer is not None and truths[i]]
        results = [
            RewardResult(self.incorrect_reward, False, {"answer_found": float(a is not None), "verify_timeout": 0.0})
            for a in answers
        ]
        if not todo:
            return results
        if self.symbolic:
            timeout = timeout_s if timeout_s is not None and timeout_s > 0 else self.timeout_s
            outcomes = verify_batch([(answers[i], truths[i]) for i in todo], timeout)
            for i, outcome in zip(todo, outcomes):
                result = results[i]
                result.correct = outcome.correct
                result.score = self.correct_reward if outcome.correct else self.incorrect_reward
                if outcome.timed_out:
                    result.failed = True
                    result.error = f"verification timed out after {timeout:g} s"
                    result.metrics["verify_timeout"] = 1.0
                elif outcome.error is not None:
                    result.failed = True
                    result.error = f"verification failed: {outcome.error}"
        else:
            for i in todo:
                correct = normalize_answer(answers[i] or "") == normalize_answer(truths[i])
                results[i].correct = correct
                results[i].score = self.correct_reward if correct else self.incorrect_reward
        return results


# --------------------------------------------------------------------------------------------
# Safe scoring
# --------------------------------------------------------------------------------------------

_warned: dict[str, set[str]] = {}
_warned_lock = threading.Lock()
_abandoned: list[threading.Thread] = []
_abandoned_lock = threading.Lock()


def _reset_after_fork() -> None:
    # Locks held by another thread at fork time would deadlock the child; hung threads of the
    # parent do not exist in the child.
    global _warned_lock, _abandoned_lock
    _warned_lock = threading.Lock()
    _abandoned_lock = threading.Lock()
    _abandoned.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _warn_once(fn_name: str, message: str) -> None:
    """Warn about a reward failure the first time this function shows this error."""
    with _warned_lock:
        seen = _warned.setdefault(fn_name, set())
        if message in seen or len(seen) > _MAX_DISTINCT_WARNINGS:
            return
        seen.add(message)
        if len(seen) > _MAX_DISTINCT_WARNINGS:
            message = f"more than {_MAX_DISTINCT_WARNINGS} distinct errors; further ones are not shown"
    warnings.warn(
        f"reward function {fn_name!r}: {message} (counted as a failed verification)",
        RewardFunctionWarning,
        stacklevel=3,
    )


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # describing must not fail
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _abandoned_alive() -> int:
    with _abandoned_lock:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        return len(_abandoned)


def _call_each(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], timeout_s: float | None) -> list[tuple[str, Any]]:
    """Call ``fn(*args)`` for every ``args`` in ``calls``; per call return ``("ok", value)``,
    ``("raised", exc)``, ``("hung", None)`` (still running after ``timeout_s``) or ``("refused",
    None)`` (not called: too many earlier calls are still hung).

    With a timeout the calls run one after another in a helper thread (a thread, not a process:
    user reward functions may close over unpicklable state), one thread per batch rather than per
    call, so that cheap calls do not each pay for starting a thread. The caller sleeps until the
    batch is done or the running call's deadline passes. Python cannot kill a thread, so a call
    past its deadline is abandoned with its thread (daemon, so it cannot block interpreter exit)
    and a new thread takes the calls after it.
    """
    if timeout_s is None:
        outcomes: list[tuple[str, Any]] = []
        for args in calls:
            try:
                outcomes.append(("ok", fn(*args)))
            except Exception as exc:  # reported as a failed result
                outcomes.append(("raised", exc))
        return outcomes
    results: list[tuple[str, Any] | None] = [None] * len(calls)
    first = 0
    while first < len(calls):
        if _abandoned_alive() >= _MAX_ABANDONED_THREADS:
            results[first:] = [("refused", None)] * (len(calls) - first)
            break
        lock = threading.Lock()
        finished = threading.Event()
        running = {"index": first, "started": time.monotonic(), "abandoned": False}

        def run(start: int = first, lock: threading.Lock = lock, running: dict = running, finished: threading.Event = finished) -> None:
            for i in range(start, len(calls)):
                with lock:
                    running["index"], running["started"] = i, time.monotonic()
                try:
                    outcome = ("ok", fn(*calls[i]))
                except BaseException as exc:  # even SystemExit must not end training
                    outcome = ("raised", exc)
                with lock:
                    if running["abandoned"]:  # declared hung while finishing: the caller moved on
                        return
                    results[i] = outcome
            finished.set()

        thread = threading.Thread(target=run, name="reward-calls", daemon=True)
        thread.start()
        while True:
            with lock:
                index, started = running["index"], running["started"]
            if finished.wait(max(0.0, started + timeout_s - time.monotonic())):
                first = len(calls)
                break
            with lock:
                if running["index"] == index and results[index] is None:  # the same call, past its deadline
                    running["abandoned"] = True
                    results[index] = ("hung", None)
                    with _abandoned_lock:
                        _abandoned.append(thread)
                    first = index + 1
                    break
    return results  # type: ignore[return-value]


def _failed(score: float, error: str) -> RewardResult:
    return RewardResult(score, False, {}, failed=True, error=error)


def score_responses(
    fn: RewardFn | Callable[..., Any],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    metadatas: Sequence[dict[str, Any]] | None = None,
    timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S,
    *,
    failure_score: float | None = None,
    prompts: Sequence[Any] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> list[RewardResult]:
    """Score every response with ``fn``, never raising because of what ``fn`` does.

    Args:
        fn: a reward function (protocol in the module docstring), typically from
            :func:`~dapo_rl.rewards.registry.resolve_reward_fn`.
        responses: model responses.
        ground_truths: one reference answer per response.
        metadatas: one dict per response, passed to ``fn`` (each call gets its own shallow copy);
            ``None`` means empty dicts.
        timeout_s: how long one call may take. A call still running after that is abandoned
            and fails. ``None`` calls ``fn`` directly, without protection against hangs.
        failure_score: score of a failed call; default ``fn.incorrect_reward`` if ``fn`` has one,
            else -1.0.
        prompts, completion_ids: each response's prompt and token ids, for a batch reward that
            ``reads_samples`` (ignored by the others).

    Returns:
        One :class:`RewardResult` per response, in order. Failures (exception, hang, garbage
        output) have ``failed=True``, ``correct=False`` and ``score=failure_score``, and produce a
        :class:`RewardFunctionWarning` once per distinct error.

    Raises:
        ValueError: the three sequences differ in length (a caller bug, not a reward failure).
    """
    n = len(responses)
    if len(ground_truths) != n or (metadatas is not None and len(metadatas) != n):
        raise ValueError(
            f"score_responses needs one ground truth and metadata per response: got {n} responses, "
            f"{len(ground_truths)} ground truths, {'no' if metadatas is None else len(metadatas)} metadatas"
        )
    if metadatas is None:
        metas: list[dict[str, Any]] = [{} for _ in range(n)]
    else:
        metas = [dict(m) if isinstance(m, Mapping) else {} for m in metadatas]
    correct_reward = float(getattr(fn, "correct_reward", 1.0))
    fail_score = float(failure_score if failure_score is not None else getattr(fn, "incorrect_reward", -1.0))
    name = _callable_name(fn)

    batch = getattr(fn, "score_batch", None)
    if callable(batch):
        try:
            samples = {"prompts": prompts, "completion_ids": completion_ids} if getattr(fn, "reads_samples", False) else {}
            results = batch(list(responses), list(ground_truths), metas, timeout_s, **samples)
            well_formed = isinstance(results, list) and len(results) == n
            if not well_formed or not all(isinstance(r, RewardResult) for r in results):
                raise _BadOutput(f"score_batch returned {type(results).__name__}, expected a list of {n} RewardResult")
        except Exception as exc:  # a broken batch scorer fails its batch, not training
            logger.debug("score_batch of %s failed", name, exc_info=True)
            error = _describe(exc)
            _warn_once(name, error)
            return [_failed(fail_score, error) for _ in range(n)]
        for result in results:
            if result.failed and result.error:
                _warn_once(name, result.error)
        return results

    results: list[RewardResult] = []
    for status, value in _call_each(fn, list(zip(responses, ground_truths, metas)), timeout_s):
        if status == "refused":
            error = f"{_MAX_ABANDONED_THREADS} earlier calls are still hung; not calling it again"
        elif status == "hung":
            error = f"did not return within {timeout_s:g} s; its thread was abandoned"
            logger.warning("reward function %r hung; abandoning its thread", name)
        elif status == "raised":
            logger.debug("reward function %s raised", name, exc_info=value)
            error = _describe(value)
        else:
            try:
                results.append(coerce_reward_output(value, correct_reward, fail_score))
                continue
            except _BadOutput as exc:
                error = f"bad return value: {exc}"
        _warn_once(name, error)
        results.append(_failed(fail_score, error))
    return results
