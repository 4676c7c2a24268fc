"""Answer equivalence with a hard time bound: ``is_equivalent`` and its batch form.

Verification runs in two tiers:

1. **Fast path, in-process.** Both answers are normalised (:mod:`dapo_rl.rewards.normalize`).
   Equal normal forms, two plain numbers, an empty answer, word answers, malformed LaTeX, and
   plain expressions with different free symbols (``5`` vs ``5x``, ``3`` vs ``three``) are
   decided right here in microseconds. In training most answers are numbers, so most checks end
   here.
2. **Symbolic path, in a worker subprocess.** Everything else (``\\sqrt{8}`` vs ``2\\sqrt{2}``,
   ``x^2+2x+1`` vs ``(x+1)^2``, sets, intervals) goes to math-verify's LaTeX/SymPy parser and
   comparator, run in a small pool of persistent worker processes.

**Why a subprocess.** SymPy can run for minutes on innocent-looking input (``9^{9^{9}}`` computes
a 370-million-digit integer). math-verify's own timeout uses ``signal.alarm``, which works only in
the main thread of the main interpreter, and cannot interrupt a long C call anyway. So its
timeouts are turned off and the bound is enforced from outside: the caller waits on the worker's
reply for ``timeout_s`` seconds and, past that, kills the worker and answers ``False``
(``timed_out=True``). Killing a process works from any thread of any process. A worker that
crashes is replaced the same way, and the call answers ``False`` with an ``error``.

**Timing contract.** ``timeout_s`` bounds the verification itself. A killed worker's replacement
starts at once and callers prefer a warm worker, but when none is warm (the first symbolic check
of a process, or right after every worker was replaced) a call also waits for one to import
math-verify and SymPy, bounded by ``startup_timeout_s``. :func:`warm_up` starts them ahead of time. A
batch verifies its symbolic pairs ``num_workers`` at a time, so its wall time is at most
``ceil(k / num_workers) * timeout_s`` (plus that start-up) for ``k`` distinct symbolic pairs.

Workers are started with ``subprocess`` running a standalone script (``_worker.py``), not with
``multiprocessing``: the spawn start method re-imports the caller's ``__main__`` in the child, so an
unguarded training script would run again inside every worker, and fork is unsafe in a
multi-threaded trainer. The script imports only math-verify, so a worker starts without importing
torch or this library.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .normalize import clean_answer, numbers_match, parse_number, squeeze_spaces

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "VerifierPool",
    "VerifierStats",
    "VerifyOutcome",
    "configure_verifier",
    "is_equivalent",
    "reset_verifier_stats",
    "shutdown_verifier",
    "verifier_stats",
    "verify_answer",
    "verify_batch",
    "warm_up",
]

logger = logging.getLogger(__name__)

#: Default per-verification timeout, in seconds.
DEFAULT_TIMEOUT_S = 5.0
# Answers longer than this (after cleaning) are compared as strings only: no final answer a model
# should be rewarded for is a 500-character formula, and SymPy time grows with length.
MAX_SYMBOLIC_CHARS = 500
_WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
# After this many consecutive failed worker start-ups the symbolic path is declared broken (and
# says why) rather than retried forever, e.g. when math-verify is not installed.
_MAX_START_FAILURES = 3


@dataclass(frozen=True)
class VerifyOutcome:
    """Result of one equivalence check.

    Attributes:
        correct: the prediction is equivalent to the ground truth. ``False`` whenever the check
            could not be completed.
        timed_out: the symbolic check exceeded its timeout and its worker was killed.
        error: why the check failed (worker crash, parse error inside math-verify, ...), else ``None``.
        method: ``"fast"`` (decided in-process), ``"symbolic"`` (math-verify in a worker),
            ``"cache"`` (a repeated pair, answered from memory) or ``"skipped"`` (undecided by the
            fast path while the symbolic path is switched off).
    """

    correct: bool
    timed_out: bool = False
    error: str | None = None
    method: str = "fast"


@dataclass
class VerifierStats:
    """Counters since start-up or the last :func:`reset_verifier_stats` (for the trainer's logs)."""

    checks: int = 0
    fast: int = 0
    symbolic: int = 0
    cache_hits: int = 0
    timeouts: int = 0
    errors: int = 0
    worker_starts: int = 0
    worker_kills: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict, e.g. for a metrics sink."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_stats = VerifierStats()
_stats_lock = threading.Lock()


def _count(**increments: int) -> None:
    with _stats_lock:
        for name, value in increments.items():
            setattr(_stats, name, getattr(_stats, name) + value)


def verifier_stats() -> VerifierStats:
    """A snapshot of the verification counters (timeouts, errors, worker restarts, ...)."""
    with _stats_lock:
        return VerifierStats(**_stats.as_dict())


def reset_verifier_stats() -> None:
    """Zero the verification counters (e.g. at the start of each training step)."""
    with _stats_lock:
        for f in fields(_stats):
            setattr(_stats, f.name, 0)


# --------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------

_LETTER_RUN_RE = re.compile(r"[^\W\d_]+")
# Letter runs that are not free symbols: constants, functions, and connectives that math-verify
# reads as list separators ("1 and 2").
_KNOWN_NAMES = frozenset(
    """
    pi e i oo inf infty infinity sqrt exp ln log lg sin cos tan cot sec csc arcsin arccos arctan
    sinh cosh tanh frac dfrac tfrac binom cdot times div and or π ℯ
    """.split()
)
_PLAIN_WORDS_RE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_ASCII_LETTER_RUN_RE = re.compile(r"[A-Za-z]+")


# LaTeX commands that introduce no symbol: numbers and operators. Any other command (``\\alpha``,
# ``\\mathbb``) may, so an expression using one is left to the parser.
_NEUTRAL_COMMANDS = frozenset(
    """
    frac dfrac tfrac sqrt cdot times div pm mp pi infty ln log exp sin cos tan cot sec csc
    arcsin arccos arctan sinh cosh tanh circ le ge leq geq neq lt gt
    """.split()
)
_COMMAND_RE = re.compile(r"\\(?:([A-Za-z]+)|.)", re.DOTALL)


def _free_letters(text: str) -> frozenset[str] | None:
    """The free symbols of a plain expression, or ``None`` if it is not plain enough to tell.

    A letter run that is not a known name is a product of symbols to the parser (``ab`` is
    a*b), so its letters are the free symbols, case-folded because math-verify treats ``A`` and
    ``a`` alike. Equations and LaTeX commands other than plain operators are not judged: commands
    can hide symbols (``\\alpha``) and equations can bind them.
    """
    if "=" in text:
        return None
    if "\\" in text:
        for m in _COMMAND_RE.finditer(text):
            if m.group(1) is not None and m.group(1) not in _NEUTRAL_COMMANDS:
                return None
        text = _COMMAND_RE.sub(" ", text)
    letters: set[str] = set()
    for run in _LETTER_RUN_RE.findall(text):
        if run.lower() not in _KNOWN_NAMES:
            letters.update(run.casefold())
    return frozenset(letters)


def _is_punctuation(text: str) -> bool:
    """No letters, digits or numeric symbols (such as ``π``, ``∞``, ``½``): no value at all."""
    return text.isascii() and not any(c.isalnum() for c in text)


def _brackets_balanced(text: str) -> bool:
    """Braces nest properly and round/square brackets pair up in number (``[0, 1)`` is fine)."""
    depth = 0
    opened = closed = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
        elif ch in "([":
            opened += 1
        elif ch in ")]":
            closed += 1
    return depth == 0 and opened == closed


def _fast_decide(pred_clean: str, gold_clean: str) -> bool | None:
    """Decide equivalence without SymPy, or return ``None`` when only the symbolic path can."""
    pred_norm = squeeze_spaces(pred_clean)
    gold_norm = squeeze_spaces(gold_clean)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    pred_num = parse_number(pred_norm)
    gold_num = parse_number(gold_norm)
    if pred_num is not None and gold_num is not None:
        return numbers_match(pred_num, gold_num)
    # Two plain expressions with different free symbols cannot be equal (a number has none).
    # This ignores cancellations such as x - x, which no final answer should be written as.
    pred_free = _free_letters(pred_clean)
    gold_free = _free_letters(gold_clean)
    if pred_free is not None and gold_free is not None:
        if pred_free != gold_free:
            return False
        if _is_punctuation(pred_norm) or _is_punctuation(gold_norm):
            return False
    # Word answers ("yes", "Tuesday", "no solution") compare as words, case-insensitively. A
    # letters-only string with a run of 3+ letters is a word, not a product of symbols.
    both_words = _PLAIN_WORDS_RE.fullmatch(pred_clean) and _PLAIN_WORDS_RE.fullmatch(gold_clean)
    if both_words and any(len(run) >= 3 for run in _ASCII_LETTER_RUN_RE.findall(pred_clean + " " + gold_clean)):
        return pred_clean.casefold() == gold_clean.casefold()
    # Malformed LaTeX cannot parse, and very long strings are not answers worth SymPy's time.
    if not _brackets_balanced(pred_clean) or not _brackets_balanced(gold_clean):
        return False
    if len(pred_clean) > MAX_SYMBOLIC_CHARS or len(gold_clean) > MAX_SYMBOLIC_CHARS:
        return False
    return None


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


class _WorkerDied(Exception):
    """The worker process exited (crash, SIGXCPU, killed from outside)."""


class _Worker:
    """One math-verify subprocess and the thread that reads its replies."""

    def __init__(self, max_memory_mb: int) -> None:
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        self._ready = False
        self._start_error: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER_SCRIPT), str(int(max_memory_mb))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: a crashing worker's traceback should be visible
            close_fds=True,
            # Own session: a Ctrl-C in the terminal reaches the trainer, which shuts workers down
            # cleanly, instead of printing a KeyboardInterrupt traceback per worker.
            start_new_session=True,
        )
        _count(worker_starts=1)
        reader = threading.Thread(target=self._read_replies, name=f"verify-worker-{self.proc.pid}", daemon=True)
        reader.start()

    def _read_replies(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            for line in stdout:
                try:
                    self._replies.put(json.loads(line))
                except ValueError:
                    logger.debug("verifier worker %d wrote a non-protocol line: %r", self.proc.pid, line[:200])
        except (OSError, ValueError):
            pass  # pipe closed under us by kill()
        finally:
            self._replies.put(None)  # EOF marker: the worker is gone

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _take_start_message(self, message: dict[str, Any] | None) -> None:
        if message is None:
            self._start_error = f"worker exited during start-up (exit code {self.proc.poll()})"
        elif not message.get("ready"):
            self._start_error = f"worker cannot verify: {message.get('error')}"
        else:
            self._ready = True

    def is_ready(self) -> bool:
        """Whether the worker has finished starting, without waiting."""
        if not self._ready and self._start_error is None:
            try:
                self._take_start_message(self._replies.get_nowait())
            except queue.Empty:
                pass
        return self._ready

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the worker has imported math-verify; raise ``_WorkerDied`` on failure."""
        if not self._ready and self._start_error is None:
            try:
                self._take_start_message(self._replies.get(timeout=timeout_s))
            except queue.Empty:
                raise _WorkerDied(f"worker did not start within {timeout_s:.0f} s") from None
        if self._start_error is not None:
            raise _WorkerDied(self._start_error)

    def request(self, pred: str, gold: str, timeout_s: float) -> dict[str, Any] | None:
        """Send one request and wait for its reply; ``None`` means it timed out."""
        self._next_id += 1
        request_id = self._next_id
        # The kernel CPU budget is only a backstop for an orphaned worker, so it is generous.
        line = json.dumps({"id": request_id, "pred": pred, "gold": gold, "cpu_s": timeout_s + 2.0}) + "\n"
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode("utf-8"))
            stdin.flush()
        except (OSError, ValueError) as exc:
            raise _WorkerDied(f"cannot write to worker: {exc}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                reply = self._replies.get(timeout=remaining)
            except queue.Empty:
                return None
            if reply is None:
                raise _WorkerDied(f"worker exited (exit code {self.proc.poll()})")
            if reply.get("id") == request_id:
                return reply
            # A reply to an older request can only be stale; skip it.

    def kill(self) -> None:
        """Stop the process now; safe to call more than once."""
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill -9 does not fail
            logger.warning("verifier worker %d did not exit after SIGKILL", self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask the worker to exit by closing its stdin, then make sure it did."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=1)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()


class VerifierPool:
    """A fixed number of math-verify worker processes, shared by every thread of this process.

    Workers start lazily on first use (or on :meth:`warm_up`) and are replaced when killed for a
    timeout or found dead. Each worker handles one request at a time; callers beyond
    ``num_workers`` wait for a free one.

    Args:
        num_workers: worker processes (default: 2, or 1 on a single-core machine).
        max_memory_mb: address-space limit per worker, so a runaway SymPy computation fails with
            ``MemoryError`` instead of exhausting the machine; ``0`` disables it.
        startup_timeout_s: how long to wait for a worker to import math-verify.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        max_memory_mb: int = 2048,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if num_workers is None:
            num_workers = max(1, min(2, os.cpu_count() or 1))
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.max_memory_mb = max_memory_mb
        self.startup_timeout_s = startup_timeout_s
        self._pid = os.getpid()
        # Idle slots hold a worker, or None for "start one when taken"; taking a slot is taking a
        # turn, so at most num_workers checks run at once.
        self._idle: list[_Worker | None] = [None] * num_workers
        self._idle_changed = threading.Condition()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._start_failures = 0
        self._broken: str | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        if not sys.executable:
            raise OSError("sys.executable is unknown; cannot start a verifier worker")
        worker = _Worker(self.max_memory_mb)
        with self._lock:
            self._all.add(worker)
        return worker

    def _acquire(self) -> _Worker | None:
        """Take an idle slot, waiting for one if all are busy."""
        with self._idle_changed:
            while not self._idle:
                self._idle_changed.wait()
            # Prefer a worker that is ready now: a replacement still importing SymPy would make
            # this caller wait for that import while a warm worker sits idle.
            for i, worker in enumerate(self._idle):
                if worker is not None and worker.is_ready():
                    return self._idle.pop(i)
            return self._idle.pop()

    def _release(self, worker: _Worker | None) -> None:
        with self._idle_changed:
            self._idle.append(worker)
            self._idle_changed.notify()

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def warm_up(self, wait: bool = True) -> None:
        """Start every worker now instead of on first use; with ``wait``, until they are ready."""
        self._started = True
        taken = [self._acquire() for _ in range(self.num_workers)]
        try:
            for i, worker in enumerate(taken):
                if worker is None or not worker.alive:
                    taken[i] = self._spawn()
            if wait:
                for worker in taken:
                    assert worker is not None
                    worker.wait_ready(self.startup_timeout_s)
        except (_WorkerDied, OSError) as exc:
            logger.warning("verifier warm-up failed: %s", exc)
        finally:
            for worker in taken:
                self._release(worker)

    def close(self) -> None:
        """Stop all workers. Only the process that created the pool may do this (after a fork
        the child must not kill its parent's workers)."""
        if os.getpid() != self._pid:
            return
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.close()

    @property
    def owned_by_this_process(self) -> bool:
        """False in a forked child, which must build its own pool."""
        return os.getpid() == self._pid

    # -- verification ------------------------------------------------------------------------

    def verify(self, pred: str, gold: str, timeout_s: float) -> VerifyOutcome:
        """Run math-verify on one (already cleaned) pair in a worker, bounded by ``timeout_s``."""
        if self._broken is not None:
            return VerifyOutcome(False, error=self._broken, method="symbolic")
        if self._closed:
            return VerifyOutcome(False, error="verifier pool is closed", method="symbolic")
        if not self._started:
            # Start every worker at the first symbolic check, not one per slot as each is first
            # taken: they then warm up in parallel instead of one after another.
            with self._lock:
                first, self._started = not self._started, True
            if first:
                self.warm_up(wait=False)
        worker = self._acquire()
        try:
            try:
                if worker is None or not worker.alive:
                    if worker is not None:
                        self._retire(worker)
                        worker = None
                    worker = self._spawn()
                worker.wait_ready(self.startup_timeout_s)
            except (_WorkerDied, OSError) as exc:
                if worker is not None:
                    self._retire(worker)
                    worker = None
                return VerifyOutcome(False, error=self._start_failed(exc), method="symbolic")
            with self._lock:
                self._start_failures = 0
            try:
                reply = worker.request(pred, gold, timeout_s)
            except _WorkerDied as exc:
                self._retire(worker)
                worker = self._respawn()
                return VerifyOutcome(False, error=str(exc), method="symbolic")
            if reply is None:
                _count(worker_kills=1)
                logger.info("verification timed out after %.1f s; replacing worker %d", timeout_s, worker.proc.pid)
                self._retire(worker)
                worker = self._respawn()
                return VerifyOutcome(False, timed_out=True, method="symbolic")
            error = reply.get("error")
            return VerifyOutcome(bool(reply.get("correct")) and not error, error=error, method="symbolic")
        finally:
            self._release(worker)

    def _respawn(self) -> _Worker | None:
        """Start a replacement right away, so it warms up while the caller moves on."""
        if self._closed:
            return None  # a closed pool must not leave new workers behind
        try:
            return self._spawn()
        except OSError as exc:
            logger.warning("cannot start a verifier worker: %s", exc)
            return None  # the next caller retries, through the start-up failure accounting

    def _start_failed(self, exc: BaseException) -> str:
        """Record a failed start; after several in a row, switch the symbolic path off."""
        message = f"verifier worker failed to start: {exc}"
        with self._lock:
            self._start_failures += 1
            give_up = self._start_failures >= _MAX_START_FAILURES and self._broken is None
            if give_up:
                self._broken = f"symbolic verification disabled after {self._start_failures} failed starts: {exc}"
        if give_up:
            warnings.warn(self._broken or message, RuntimeWarning, stacklevel=4)
        return message

    def verify_many(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[VerifyOutcome]:
        """Verify cleaned pairs, ``num_workers`` at a time; results in input order."""
        if len(pairs) <= 1 or self.num_workers == 1:
            return [self.verify(p, g, timeout_s) for p, g in pairs]
        with ThreadPoolExecutor(max_workers=min(self.num_workers, len(pairs)), thread_name_prefix="verify") as pool:
            return list(pool.map(lambda pair: self.verify(pair[0], pair[1], timeout_s), pairs))


# --------------------------------------------------------------------------------------------
# Module-level pool, cache and public functions
# --------------------------------------------------------------------------------------------


class _OutcomeCache:
    """Bounded LRU memory of symbolic outcomes: a group's G responses often repeat an answer."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._data: OrderedDict[tuple[str, str], tuple[VerifyOutcome, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], timeout_s: float) -> VerifyOutcome | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            outcome, used_timeout = entry
            # A timeout only predicts another timeout if this call does not allow more time.
            if outcome.timed_out and timeout_s > used_timeout:
                return None
            self._data.move_to_end(key)
            return outcome

    def put(self, key: tuple[str, str], outcome: VerifyOutcome, timeout_s: float) -> None:
        # Crashes and start-up failures say nothing about the pair itself; do not remember them.
        if outcome.error is not None or self.max_size <= 0:
            return
        with self._lock:
            self._data[key] = (outcome, timeout_s)
            self._data.move_to_end(key)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@dataclass
class _Config:
    num_workers: int | None = None
    max_memory_mb: int = 2048
    startup_timeout_s: float = 60.0
    symbolic: bool = True


_config = _Config()
_pool: VerifierPool | None = None
_pool_lock = threading.Lock()
_cache = _OutcomeCache(max_size=8192)


def _get_pool() -> VerifierPool:
    global _pool
    with _pool_lock:
        if _pool is None or not _pool.owned_by_this_process:
            # A forked child inherits the parent's pool object but not the right to its workers.
            _pool = VerifierPool(_config.num_workers, _config.max_memory_mb, _config.startup_timeout_s)
        return _pool


def configure_verifier(
    *,
    num_workers: int | None = None,
    max_memory_mb: int | None = None,
    startup_timeout_s: float | None = None,
    symbolic: bool | None = None,
    cache_size: int | None = None,
) -> None:
    """Change the shared verifier's settings; arguments left ``None`` keep their value.

    Running workers are stopped and replaced lazily with the new settings.

    Args:
        num_workers: worker processes for symbolic checks.
        max_memory_mb: per-worker address-space limit (0 = none).
        startup_timeout_s: how long to wait for a worker to start.
        symbolic: ``False`` disables the symbolic path: anything the fast path cannot decide is
            judged not equivalent (``method="skipped"``).
        cache_size: how many symbolic outcomes to remember (0 = no cache).
    """
    global _pool
    if num_workers is not None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        _config.num_workers = num_workers
    if max_memory_mb is not None:
        _config.max_memory_mb = max_memory_mb
    if startup_timeout_s is not None:
        _config.startup_timeout_s = startup_timeout_s
    if symbolic is not None:
        _config.symbolic = symbolic
    if cache_size is not None:
        _cache.max_size = cache_size
        _cache.clear()
    with _pool_lock:
        old, _pool = _pool, None
    if old is not None:
        old.close()


def warm_up(wait: bool = True) -> None:
    """Start the verifier's workers ahead of the first symbolic check (e.g. before training)."""
    if _config.symbolic:
        _get_pool().warm_up(wait=wait)


def shutdown_verifier() -> None:
    """Stop the worker processes (also done automatically at interpreter exit)."""
    global _pool
    with _pool_lock:
        old, _pool = _pool, None
    if old is not None:
        old.close()


atexit.register(shutdown_verifier)


def _reset_after_fork() -> None:
    # A fork can happen while another thread holds one of these locks; the child would then
    # deadlock on its first check. The inherited pool belongs to the parent: forget it, never
    # close it (that would kill the parent's workers).
    global _stats_lock, _pool_lock, _pool
    _stats_lock = threading.Lock()
    _pool_lock = threading.Lock()
    _pool = None
    _cache._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _check_timeout(timeout_s: float) -> float:
    timeout = float(timeout_s)
    if not timeout > 0:  # also rejects NaN
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return timeout


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def verify_batch(pairs: Iterable[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[VerifyOutcome]:
    """Check many ``(prediction, ground_truth)`` pairs; outcomes in input order.

    Pairs the fast path decides cost microseconds; the rest are de-duplicated, looked up in a
    cache, and the remainder verified on the worker pool in parallel, each bounded by
    ``timeout_s`` (see the module docstring for the exact timing contract). Never raises for any
    input strings; ``None`` counts as an empty answer, which is never correct.

    Raises:
        ValueError: ``timeout_s`` is not positive.
    """
    timeout = _check_timeout(timeout_s)
    pairs = list(pairs)
    outcomes: list[VerifyOutcome | None] = [None] * len(pairs)
    pending: dict[tuple[str, str], list[int]] = {}
    n_fast = n_cached = n_errors = 0
    for i, (prediction, ground_truth) in enumerate(pairs):
        try:
            pred_clean = clean_answer(_as_text(prediction))
            gold_clean = clean_answer(_as_text(ground_truth))
            decided = _fast_decide(pred_clean, gold_clean)
        except Exception as exc:  # a normaliser bug must not crash a training step
            logger.debug("answer normalisation failed", exc_info=True)
            outcomes[i] = VerifyOutcome(False, error=f"normalisation failed: {type(exc).__name__}: {exc}")
            n_errors += 1
            continue
        if decided is not None:
            outcomes[i] = VerifyOutcome(decided)
            n_fast += 1
        elif not _config.symbolic:
            outcomes[i] = VerifyOutcome(False, method="skipped")
            n_fast += 1
        else:
            key = (pred_clean, gold_clean)
            cached = _cache.get(key, timeout)
            if cached is not None:
                outcomes[i] = VerifyOutcome(cached.correct, cached.timed_out, cached.error, "cache")
                n_cached += 1
            else:
                pending.setdefault(key, []).append(i)
    keys = list(pending)
    try:
        results = _get_pool().verify_many(keys, timeout) if keys else []
    except Exception as exc:  # a pool bug must cost these checks, not the step
        logger.warning("symbolic verification failed unexpectedly", exc_info=True)
        failure = VerifyOutcome(False, error=f"verifier failure: {type(exc).__name__}: {exc}", method="symbolic")
        results = [failure] * len(keys)
    n_timeouts = 0
    for key, outcome in zip(keys, results, strict=True):
        _cache.put(key, outcome, timeout)
        n_timeouts += outcome.timed_out
        n_errors += outcome.error is not None
        for i in pending[key]:
            outcomes[i] = outcome
    _count(
        checks=len(pairs),
        fast=n_fast,
        cache_hits=n_cached,
        symbolic=len(keys),
        timeouts=n_timeouts,
        errors=n_errors,
    )
    return [o if o is not None else VerifyOutcome(False, error="internal: no outcome") for o in outcomes]


def verify_answer(prediction: str, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> VerifyOutcome:
    """Check one pair and say how it went (correct, timed out, error, which path decided)."""
    return verify_batch([(prediction, ground_truth)], timeout_s)[0]


def is_equivalent(prediction: str, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``prediction`` is mathematically equivalent to ``ground_truth``.

    Both arguments are *answers* (already extracted from a response, see
    :func:`dapo_rl.rewards.extract.extract_answer`). Equivalence follows the normalisation
    conventions of :mod:`dapo_rl.rewards.normalize` and, beyond them, math-verify's symbolic
    comparison. The check is bounded by ``timeout_s`` in any thread of any process; a check that
    times out or fails counts as not equivalent. Use :func:`verify_answer` to see why.
    """
    return verify_answer(prediction, ground_truth, timeout_s).correct
