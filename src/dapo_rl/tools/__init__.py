"""Tools and environments a multi-turn rollout gives the model: typed Python functions (their
schema from their hints and docstring), the parsers that find tool calls in the model's text, and
the environment protocol. What they return is an observation the model sees; a tool's failure is
an observation too, never a crash."""

from dapo_rl.tools.environment import EnvironmentFailures, load_environment
from dapo_rl.tools.parsers import TOOL_PARSERS, ToolCall, ToolCallError, hermes_tool_calls
from dapo_rl.tools.spec import TOOL_ERROR_KINDS, Tool, ToolResult, load_tools, tool_from_function

__all__ = ["TOOL_ERROR_KINDS", "TOOL_PARSERS", "EnvironmentFailures", "Tool", "ToolCall", "ToolCallError", "ToolResult",
           "hermes_tool_calls", "load_environment", "load_tools", "tool_from_function"]
