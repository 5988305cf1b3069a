"""Tools an agent may call in the multi-turn workflow: a registry of classes with a name, an
argument schema and `__call__` (docs/agents.md)."""
from llmrl.tools.base import TOOLS, Tool, ToolResult, build_tools, register_tool

__all__ = ["TOOLS", "Tool", "ToolResult", "build_tools", "register_tool"]
