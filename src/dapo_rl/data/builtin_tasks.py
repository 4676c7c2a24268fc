"""The built-in tasks, by name: ``data.train=builtin:<task>`` is the task's data and
``model.path=builtin:<task>-tiny`` its warmed-up tiny model, built locally (no download).

- ``chain`` (the quickstart) and ``chain-long`` (the ablation's): :mod:`dapo_rl.data.synthetic`;
- ``calculator`` (multi-turn, with a calculator tool): :mod:`dapo_rl.data.calculator`.

A task is an object with ``name``, ``warmup_steps``, ``vocab`` (the characters of its tokenizer),
``words`` (its tokenizer's longer one-token pieces), ``max_positions`` (its model's context),
``min_greedy_accuracy`` (a floor its warmed-up model must reach, or None), ``reward`` (the reward
``reward.function=auto`` picks),
``splits(train_size, eval_size, seed)`` and ``warmup_segments(rng, settings)`` (one supervised
warm-up example as ``(text, trained)`` segments). The settings a task brings when the user does
not give them (its model, its held-out set, its tools) are :data:`dapo_rl.config.BUILTIN_TASK_DEFAULTS`.
"""

from __future__ import annotations

from typing import Any

from dapo_rl.config import BUILTIN_PREFIX
from dapo_rl.data.calculator import CALCULATOR
from dapo_rl.data.synthetic import CHAIN, CHAIN_LONG

BUILTIN_TASKS: dict[str, Any] = {task.name: task for task in (CHAIN, CHAIN_LONG, CALCULATOR)}


def builtin_task(name: str) -> Any:
    """The task of a built-in dataset name (``builtin:chain-long``).

    Raises:
        KeyError: no such task (the message lists the known names).
    """
    key = name.removeprefix(BUILTIN_PREFIX)
    if not name.startswith(BUILTIN_PREFIX) or key not in BUILTIN_TASKS:
        raise KeyError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS)}")
    return BUILTIN_TASKS[key]
