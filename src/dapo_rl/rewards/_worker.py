"""Subprocess side of the symbolic verifier and of the sandboxed Python tool (run as a script, not
imported by the library).

The parent (:mod:`dapo_rl.rewards.verify`) starts ``python _worker.py MAX_MEMORY_MB`` and talks
to it over stdin/stdout, one JSON object per line:

* on start-up the worker sends ``{"ready": true, "pid": ...}`` (or ``{"ready": false, "error":
  ...}`` if math-verify cannot be imported);
* each request ``{"id": n, "pred": str, "gold": str, "cpu_s": float}`` gets the reply
  ``{"id": n, "correct": bool, "error": str | null}``.

The parent enforces the wall-clock timeout by killing this process, which works from any thread
of any process. Two kernel-enforced limits back it up, because a Python-level watchdog cannot run
while SymPy sits inside one long C call (a big-integer power holds the GIL): ``RLIMIT_AS`` turns a
runaway allocation into a ``MemoryError`` instead of an OOM kill of the machine, and a per-request
``RLIMIT_CPU`` budget makes the kernel end a computation whose parent has vanished.

This file imports only the standard library and math-verify, so it starts without importing the
rest of ``dapo_rl`` (and its torch dependency).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from functools import lru_cache
from typing import Any

try:  # ``resource`` is POSIX-only; without it the parent's kill is the only bound.
    import resource
except ImportError:  # pragma: no cover - non-POSIX
    resource = None  # type: ignore[assignment]


def _limit_memory(max_memory_mb: int) -> None:
    if resource is None or max_memory_mb <= 0:
        return
    limit = max_memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass  # a tighter limit set from outside wins; nothing to do


def _set_cpu_budget(seconds: float) -> None:
    """Let this request use at most ``seconds`` more CPU time before the kernel sends SIGXCPU."""
    if resource is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(used + seconds)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass


def _describe(exc: BaseException) -> str:
    # str() of some SymPy exceptions prints the expression, which can itself be huge or slow.
    try:
        message = str(exc)[:200]
    except Exception:  # describing an error must never fail
        message = "<unprintable>"
    return f"{type(exc).__name__}: {message}"


def main() -> int:
    """Serve verification requests until stdin closes."""
    max_memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    # The protocol owns the real stdout; anything a library prints goes to stderr instead, so a
    # stray print() can never corrupt a reply.
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message, ensure_ascii=True) + "\n")
        protocol.flush()

    _limit_memory(max_memory_mb)
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except Exception as exc:  # reported to the parent, which disables the path
        send({"ready": False, "error": _describe(exc)})
        return 1
    # Timeouts are disabled on purpose (they are the parent's job), so silence math-verify's
    # warning about that and its per-expression parse warnings.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # SymPy deprecation chatter about user input would otherwise flood the trainer's stderr.
    warnings.simplefilter("ignore")

    @lru_cache(maxsize=1024)
    def parse_answer(answer: str) -> tuple[Any, ...]:
        # The answer is already extracted; the box tells math-verify to read all of it as LaTeX.
        return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=None))

    def judge(pred: str, gold: str) -> bool:
        gold_parsed = parse_answer(gold)
        pred_parsed = parse_answer(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))

    # Warm up: the first parse builds the LaTeX grammar, a one-off cost that should not count
    # against the first real request's timeout.
    try:
        judge("\\frac{1}{2}", "0.5")
    except Exception as exc:  # a warm-up failure shows up again, and is reported, on real requests
        print(f"verifier worker warm-up failed: {_describe(exc)}", file=sys.stderr)
    send({"ready": True, "pid": os.getpid()})

    for raw in sys.stdin.buffer:
        try:
            request = json.loads(raw)
            request_id = request["id"]
            pred, gold = str(request["pred"]), str(request["gold"])
            cpu_s = float(request.get("cpu_s", 0))
        except Exception as exc:  # a malformed line is answered, not fatal
            send({"id": None, "correct": False, "error": "bad request: " + _describe(exc)})
            continue
        if cpu_s > 0:
            _set_cpu_budget(cpu_s)
        try:
            correct, error = judge(pred, gold), None
        except (Exception, TimeoutException) as exc:  # any failure means "not verified"
            correct, error = False, _describe(exc)
        send({"id": request_id, "correct": correct, "error": error})
    return 0


def run_code(max_memory_mb: int, cpu_s: float, max_file_bytes: int) -> int:
    """``python _worker.py --run-code MB CPU_S FILE_BYTES``: the sandboxed Python tool's child
    (:mod:`dapo_rl.tools.python`). The same kernel limits as a verification (address space, CPU
    time), plus the size of any file written (its output included), then the program read from
    stdin runs as ``__main__``. Its exit status is the program's."""
    _limit_memory(max_memory_mb)
    if cpu_s > 0:
        _set_cpu_budget(cpu_s)
    if resource is not None and max_file_bytes > 0:
        limit = max_file_bytes
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        except (ValueError, OSError):
            pass
    code = sys.stdin.read()
    sys.stdin = open(os.devnull)  # the program reads nothing more from the parent
    exec(compile(code, "<tool code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-code":
        sys.exit(run_code(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
    sys.exit(main())
