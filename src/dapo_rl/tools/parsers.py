"""Tool-call parsers: the model's text of one turn → the calls it makes (``rollout.tool_parser``).

A parser is ``fn(text) -> list[ToolCall]``, raising :class:`ToolCallError` on a call it cannot
read (the model sees the error); an empty list means the turn makes no call, which ends the
trajectory. Registered in :data:`TOOL_PARSERS`, or given by import path ``pkg.module:function``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from dapo_rl.algorithm.registry import Registry


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any  # the JSON the model wrote (a dict when well formed)


class ToolCallError(ValueError):
    """A call the parser found but cannot read; its message is what the model is told."""


TOOL_PARSERS: Registry[Callable[[str], list[ToolCall]]] = Registry("tool-call parser")

_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@TOOL_PARSERS.register("hermes")
def hermes_tool_calls(text: str) -> list[ToolCall]:
    """The Hermes / Qwen format: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (verl's ``hermes`` format, TRL's default for Qwen models). An unclosed block, JSON that does not
    parse, or an object without a ``name`` is a :class:`ToolCallError`."""
    calls = []
    for match in _HERMES.finditer(text):
        body, closing = match.group(1).strip(), match.group(2)
        if not closing:
            raise ToolCallError("error: a <tool_call> block is not closed with </tool_call>")
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"error: the tool call is not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise ToolCallError('error: a tool call is a JSON object {"name": ..., "arguments": {...}}')
        calls.append(ToolCall(payload["name"], payload.get("arguments", {})))
    return calls
