"""A tool is a plain Python function with type hints and a docstring (TRL's ``tools=``, verl's
function tools): its JSON schema comes from :func:`transformers.utils.get_json_schema` and reaches
the model through the chat template's ``tools=`` argument; a call runs it with the model's
arguments, bounded in time, and its result (or failure) becomes the model's next observation."""

from __future__ import annotations

import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

from dapo_rl.algorithm.registry import import_path
from dapo_rl.errors import one_line

# What can go wrong with a call, as counted in the metrics (``rollout/tool_errors/<kind>``).
TOOL_ERROR_KINDS = ("parse_error", "unknown_tool", "bad_arguments", "exception", "timeout")


@dataclass(frozen=True)
class ToolResult:
    """A call's observation text, and the kind of failure when it failed (one of :data:`TOOL_ERROR_KINDS`)."""

    text: str
    error: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with its JSON schema (``{"type": "function", "function": {...}}``)."""

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]

    def call(self, arguments: Any, timeout_s: float, pool: ThreadPoolExecutor) -> ToolResult:
        """Run the function on ``arguments`` (a JSON object from the model) in ``pool``, waiting at
        most ``timeout_s``. Arguments that do not bind to the signature, an exception and a timeout
        are observations the model sees; a result that is not a string is JSON (or ``str``)."""
        if not isinstance(arguments, dict):
            return ToolResult(f"error: the arguments of {self.name} must be a JSON object, got {json.dumps(arguments)[:200]}",
                              "bad_arguments")
        try:
            inspect.signature(self.function).bind(**arguments)
        except TypeError as exc:
            return ToolResult(f"error: bad arguments for {self.name}: {one_line(exc, 200)}", "bad_arguments")
        future = pool.submit(self.function, **arguments)
        try:
            value = future.result(timeout=timeout_s)
        except FutureTimeout:
            # A thread cannot be killed: it finishes in the background, its result unused. Code
            # that may never return belongs in a subprocess (dapo_rl.tools.python).
            return ToolResult(f"error: {self.name} did not return within {timeout_s:g} s", "timeout")
        except Exception as exc:  # noqa: BLE001 - a tool's failure is an observation
            return ToolResult(f"error: {self.name} raised {type(exc).__name__}: {one_line(exc, 300)}", "exception")
        if isinstance(value, str):
            return ToolResult(value)
        try:
            return ToolResult(json.dumps(value))
        except (TypeError, ValueError):
            return ToolResult(str(value))


def tool_from_function(function: Callable[..., Any]) -> Tool:
    """The :class:`Tool` of a typed, documented function.

    Raises:
        ValueError: the function lacks type hints or a docstring (the message names it).
    """
    from transformers.utils import get_json_schema

    name = getattr(function, "__name__", repr(function))
    try:
        schema = get_json_schema(function)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own parsing errors
        raise ValueError(f"tool {name} needs type hints on every argument and a docstring with an Args: section "
                         f"({one_line(exc, 200)})") from None
    return Tool(name=schema["function"]["name"], function=function, schema=schema)


def load_tools(paths: list[str]) -> list[Tool]:
    """The tools named by import paths ``pkg.module:function``.

    Raises:
        ValueError: a path that does not import, is not a function, lacks hints or a docstring, or
            two tools with one name.
    """
    tools: list[Tool] = []
    for path in paths:
        function = import_path(path, "tool")
        if not callable(function) or inspect.isclass(function):
            raise ValueError(f"tool {path!r} is not a function")
        tools.append(tool_from_function(function))
    names = [t.name for t in tools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"two tools are named {duplicated[0]!r}; give each tool its own function name")
    return tools
