"""A Python tool (ReTool-style): the model writes a program, the tool runs it and returns what it
printed. Name it in a run as ``rollout.tools=[dapo_rl.tools.python:python]``.

Each call runs in a new subprocess, started the way the symbolic verifier starts its workers (the
same script, :mod:`dapo_rl.rewards._worker`, and the same kernel limits), and:

- is killed, with every process it started, after ``timeout_s`` of wall time;
- has an address-space limit (``max_memory_mb``: a runaway allocation is a ``MemoryError``), a CPU
  time limit, and a limit on the size of any file it writes, its output included (``max_output_kb``:
  past it the kernel stops the program, and the result says so);
- inherits no environment variable (no tokens, keys or proxies), runs Python in isolated mode
  (``-I``: no user site-packages, no ``PYTHON*`` variables) and starts in a fresh scratch folder
  that is deleted afterwards;
- gets nothing from the parent on standard input but its program.

What it does **not** isolate: it runs as the same user as the trainer, so it can read and write
any file that user can (the scratch folder is only where it starts), it can open network
connections, and it sees the machine's processes. It bounds mistakes and runaway programs; it is
not a security boundary against hostile code. For that, run the trainer in a container or VM
without credentials or network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dapo_rl.rewards import _worker

_WORKER = Path(_worker.__file__)


@dataclass(frozen=True)
class PythonRun:
    """A program's printed output (standard output, then standard error), whether it finished
    cleanly, and why not."""

    output: str
    ok: bool
    problem: str | None = None  # "timeout", "output limit", "exit status N"

    @property
    def text(self) -> str:
        """What the model sees."""
        if self.ok:
            return self.output
        return f"{self.output}\n[{self.problem}]".lstrip("\n")


def run_python(code: str, *, timeout_s: float = 5.0, max_memory_mb: int = 512, max_output_kb: int = 64) -> PythonRun:
    """Run ``code`` in a limited, killable subprocess (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="dapo-python-tool-") as scratch:
        out_path = Path(scratch, ".output")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(_WORKER), "--run-code", str(max_memory_mb), str(timeout_s), str(max_output_kb * 1024 + 1)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=scratch, env={}, start_new_session=True,
            )
            try:
                proc.communicate(code.encode("utf-8"), timeout=timeout_s)
                problem = None
            except subprocess.TimeoutExpired:
                problem = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        raw = out_path.read_bytes()
    limit = max_output_kb * 1024
    if problem is None and (proc.returncode == -signal.SIGXFSZ or len(raw) > limit):
        problem = "output limit"
    elif problem is None and proc.returncode != 0:
        problem = f"exit status {proc.returncode}"
    text = raw[:limit].decode("utf-8", errors="replace")
    return PythonRun(text.rstrip("\n"), problem is None, problem)


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: the program; print the results you need, e.g. print(12345 * 6789)
    """
    return run_python(code).text
