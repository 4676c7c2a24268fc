"""Reward functions by name: the built-ins, user registrations, and ``package.module:function``.

Built-in names:

===============  ============================================================================
``math``         answer in any format (``Answer:``, ``\\boxed{}``, ``####``), checked symbolically
``dapo``         only the DAPO format, last ``Answer: X`` line, checked symbolically
``gsm8k``        only ``#### X``, checked symbolically
``boxed``        only ``\\boxed{X}``, checked symbolically
``exact``        answer in any format, equal to the ground truth after normalisation (no SymPy)
``last_number``  the last number in the response equals the ground truth (lenient)
``chain``        the built-in chain tasks' answer, the digit after the last ``#``
===============  ============================================================================

Every built-in scores ``correct_reward`` (default +1) for a correct answer and
``incorrect_reward`` (default -1) otherwise.

The names live in :data:`REWARDS`, a :class:`~dapo_rl.algorithm.registry.Registry` of reward
factories, with the same rules as the algorithm's plug points.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .chain import chain_reward
from .functions import MathReward, NamedReward, RewardFn
from dapo_rl.algorithm.registry import Registry
from dapo_rl.config import BUILTIN_PREFIX
from dapo_rl.data.builtin_tasks import builtin_task

__all__ = [
    "REWARDS",
    "RewardFactory",
    "available_rewards",
    "register_reward",
    "register_reward_factory",
    "resolve_reward_fn",
]

#: Builds a reward function from the (correct_reward, incorrect_reward) pair.
RewardFactory = Callable[[float, float], RewardFn]


def _imported_reward(spec: str, fn: Any) -> RewardFactory:
    """A reward function imported by path, as a factory of :class:`NamedReward` objects named ``spec``."""
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is a {type(fn).__name__}, not a callable; point it at a "
                         "function fn(response, ground_truth, metadata) -> float | dict")
    return lambda correct_reward, incorrect_reward: NamedReward(fn, spec, correct_reward, incorrect_reward)


#: Reward factories by name; an import path ``package.module:function`` names a plain reward function.
REWARDS: Registry[RewardFactory] = Registry("reward function", adapt=_imported_reward)


def register_reward_factory(name: str, factory: RewardFactory | None = None, *, overwrite: bool = False) -> Any:
    """Register ``factory(correct_reward, incorrect_reward) -> reward fn`` under ``name``.

    Usable directly or as a decorator. Registering a taken name raises ``ValueError`` unless
    ``overwrite`` is true, so two plugins cannot silently replace each other.
    """
    return REWARDS.register(name.strip(), factory, overwrite=overwrite)


def register_reward(name: str, fn: Callable[..., Any] | None = None, *, overwrite: bool = False) -> Any:
    """Register a plain reward function ``fn(response, ground_truth, metadata)`` under ``name``.

    Usable directly or as a decorator. The configured correct/incorrect rewards are used for
    ``bool`` returns and failures; numeric returns are taken as they are. Each call registers a
    new factory, so registering a taken name again raises ``ValueError`` unless ``overwrite``.
    """

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f):
            raise ValueError(f"Cannot register {f!r} as reward {name!r}: it is not callable.")
        register_reward_factory(
            name, lambda correct, incorrect: NamedReward(f, name, correct, incorrect), overwrite=overwrite
        )
        return f

    return add(fn) if fn is not None else add


def available_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(REWARDS.names())


def resolve_reward_fn(
    spec: str | Callable[..., Any], correct_reward: float = 1.0, incorrect_reward: float = -1.0, *, data: str | None = None
) -> RewardFn:
    """Turn a configuration value into a reward function (``dapo train`` and ``dapo eval`` both use it).

    Args:
        spec: a registered name (see :func:`available_rewards`), an import path
            ``package.module:function`` (or ``package.module:Class.method``), a callable, or
            ``auto``: a built-in task's own reward for its data (``builtin:chain``: ``chain``,
            ``builtin:calculator``: ``last_number``), the math verifier otherwise.
        correct_reward: score of a correct answer (built-ins; also used for ``True`` returns).
        incorrect_reward: score of a wrong answer and of any failed call.

    Returns:
        A reward function carrying ``name``, ``correct_reward`` and ``incorrect_reward``
        attributes, ready for :func:`~dapo_rl.rewards.functions.score_responses`.

    Raises:
        ValueError: the name is unknown, the module cannot be imported, the attribute is missing
            or not callable. The message names the spec and how to fix it.
    """
    if callable(spec):
        name = getattr(spec, "__qualname__", type(spec).__name__)
        return NamedReward(spec, name, float(correct_reward), float(incorrect_reward))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"Invalid reward function spec {spec!r}: expected a registered name or 'package.module:function'."
        )
    key = spec.strip()
    if key == "auto":
        try:
            key = builtin_task(data).reward if data is not None and data.startswith(BUILTIN_PREFIX) else "math"
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    return REWARDS.get(key)(float(correct_reward), float(incorrect_reward))


def _builtin(style: str, name: str, symbolic: bool = True) -> RewardFactory:
    def factory(correct_reward: float, incorrect_reward: float) -> RewardFn:
        return MathReward(
            style=style, correct_reward=correct_reward, incorrect_reward=incorrect_reward, symbolic=symbolic, name=name
        )

    return factory


register_reward_factory("math", _builtin("auto", "math"))
register_reward_factory("dapo", _builtin("dapo", "dapo"))
register_reward_factory("gsm8k", _builtin("gsm8k", "gsm8k"))
register_reward_factory("boxed", _builtin("boxed", "boxed"))
register_reward_factory("exact", _builtin("auto", "exact", symbolic=False))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number_reward(response: str, ground_truth: str, metadata: dict[str, Any]) -> bool:
    """Correct when the last number written in the response equals the ground truth.

    The lenient extraction of lm-eval's "flexible-extract": for small models that answer in prose
    ("3 + 4 = 7") rather than in a fixed format. Thousands separators are accepted.
    """
    from dapo_rl.rewards.normalize import numbers_match, parse_number

    found = _NUMBER.findall(response)
    if not found:
        return False
    predicted, truth = parse_number(found[-1].replace(",", "")), parse_number(ground_truth.strip().replace(",", ""))
    return predicted is not None and truth is not None and numbers_match(predicted, truth)


register_reward("last_number", last_number_reward)
register_reward("chain", chain_reward)
