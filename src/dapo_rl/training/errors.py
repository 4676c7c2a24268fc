"""Errors that end a training run on purpose, each mapped by the CLI to an exit code.

Kept in a module of their own, free of torch and transformers, so that the command line can
report a bad config without importing the whole training stack.
"""

from __future__ import annotations

import signal


class RunError(RuntimeError):
    """A problem with the run's inputs or output folder; the message says what to do (exit 2)."""


class RunFailed(RuntimeError):
    """The run stopped on a fault outside its inputs (a rollout server died) after saving its
    progress; the message names the fault and how to resume (exit 1)."""

    exit_code = 1


class RunInterrupted(BaseException):
    """The run stopped because of SIGINT or SIGTERM (exit 128 + signal number: 130 or 143).

    A ``BaseException``, like ``KeyboardInterrupt``, because a second signal raises it from the
    handler in the middle of whatever is running, and code that guards a user callback with
    ``except Exception`` (reward functions) must not swallow it.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
