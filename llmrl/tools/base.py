"""The tool contract and registry.

A tool is a class registered by name. It has typed `Options` (its recipe keys), a JSON `schema`
of its arguments (what a chat template that supports tools shows the model), and `__call__`,
which takes the parsed arguments and returns the text the agent sees. A tool may raise: the
workflow turns any exception, and any call slower than the timeout, into an error observation
and counts it; a failing tool never stops a run.
"""
from __future__ import annotations

import importlib
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from llmrl.config_base import Section
from llmrl.registry import Registry

TOOLS: Registry[type["Tool"]] = Registry("tool", loader=lambda: importlib.import_module("llmrl.tools.search"))


class NoToolOptions(Section):
    """A tool without options."""


class Tool(ABC):
    """Base class. `name` is what the model writes to call it; `description` and `parameters`
    form the schema a tool-calling chat template renders."""

    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    Options: type[Section] = NoToolOptions

    def __init__(self, options: Section | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def __call__(self, **arguments: Any) -> str:
        """The observation text for one call."""

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema (what `apply_chat_template(tools=...)` takes)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def close(self) -> None:
        """Release what the tool holds (a client session); nothing by default."""


def register_tool(name: str) -> Callable[[type[Tool]], type[Tool]]:
    def register(cls: type[Tool]) -> type[Tool]:
        cls.name = name
        return TOOLS.register(name, cls)

    return register


def build_tools(specs: dict[str, dict[str, Any]]) -> dict[str, Tool]:
    """Tools by name from the workflow's `tools` option ({name: options}); errors name the bad key."""
    tools = {}
    for name, options in specs.items():
        cls = TOOLS[name]
        try:
            tools[name] = cls(cls.Options.model_validate(options or {}))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"rollout.workflow.tools.{name}: {problems}") from None
    return tools


@dataclass
class ToolResult:
    text: str
    ok: bool
    timed_out: bool
    seconds: float


class ToolRunner:
    """Runs a turn's tool calls concurrently, each in a daemon thread, all under `timeout_s` from
    the start of the turn's calls. A call that raises or overruns becomes an error observation;
    an overrunning thread is abandoned, not killed (Python cannot kill threads; being a daemon it
    cannot hold the process open at exit), so a tool that can hang should have its own timeout."""

    def __init__(self, tools: dict[str, Tool], timeout_s: float) -> None:
        self.tools = tools
        self.timeout_s = timeout_s

    def run(self, calls: list[tuple[str, dict[str, Any]]]) -> list[ToolResult]:
        slots: list[dict[str, Any]] = [{} for _ in calls]
        threads: list[threading.Thread | None] = []
        for (name, arguments), slot in zip(calls, slots):
            tool = self.tools.get(name)
            if tool is None:
                threads.append(None)
                continue
            thread = threading.Thread(target=_timed, args=(tool, arguments, slot), daemon=True, name=f"llmrl-tool-{name}")
            thread.start()
            threads.append(thread)
        deadline = time.perf_counter() + self.timeout_s
        results = []
        for (name, _), thread, slot in zip(calls, threads, slots):
            if thread is None:
                known = ", ".join(sorted(self.tools)) or "none"
                results.append(ToolResult(f"error: no tool named '{name}' (tools: {known})", False, False, 0.0))
                continue
            thread.join(max(deadline - time.perf_counter(), 0.0))
            if thread.is_alive():
                results.append(ToolResult(f"error: {name} timed out after {self.timeout_s:g} s", False, True, self.timeout_s))
            elif "error" in slot:
                err = slot["error"]
                results.append(ToolResult(f"error: {name} failed: {type(err).__name__}: {err}"[:500], False, False, slot["seconds"]))
            else:
                results.append(ToolResult(slot["text"], True, False, slot["seconds"]))
        return results

    def close(self) -> None:
        for tool in self.tools.values():
            tool.close()


def _timed(tool: Tool, arguments: dict[str, Any], slot: dict[str, Any]) -> None:
    started = time.perf_counter()
    try:
        slot["text"] = str(tool(**arguments))
    except Exception as exc:  # noqa: BLE001 - any tool failure becomes an observation
        slot["error"] = exc
    slot["seconds"] = time.perf_counter() - started
