"""Environments (``rollout.environment=pkg.module:Class``; TRL's ``environment_factory``, verl's
agent loops, SkyRL-gym): one instance per trajectory.

- ``reset(row) -> str | None``: start on the dataset row (a dict: ``prompt``, ``answer`` and the
  row's other fields); return the first user message to use instead of the dataset's prompt, or
  None to keep it.
- ``step(model_text) -> (observation | None, done)``: the model's text of one turn; the
  observation is the next message the model sees (None: nothing more), ``done`` ends the trajectory.
- ``reward() -> float`` (optional): the trajectory's reward, replacing the dataset's reward function.

An environment that raises ends its trajectory with the incorrect reward (counted as
``rollout/environment_failures``); the run stops only after ``rollout.max_environment_failures``
consecutive failures.
"""

from __future__ import annotations

import inspect

from dapo_rl.algorithm.registry import import_path


class EnvironmentFailures(RuntimeError):
    """Environments failed too many times in a row (``rollout.max_environment_failures``)."""


def load_environment(path: str) -> type:
    """The environment class ``pkg.module:Class`` names.

    Raises:
        ValueError: it does not import, is not a class, or has no ``step`` (or no ``reset``).
    """
    cls = import_path(path, "environment")
    if not inspect.isclass(cls):
        raise ValueError(f"environment {path!r} is not a class")
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"environment {path!r} has no {method}() method; an environment defines reset(row) and "
                             f"step(model_text) -> (observation, done)")
    return cls
