"""Tool-call protocols: how an agent's turn text becomes tool calls or a final answer, and how tool
results are written back into the context. Registered by name (`rollout.workflow.protocol`).

  - `tags`: the Search-R1 tag protocol that IGPO uses (Jin et al. 2025, arXiv 2503.09516; Wang
    et al. 2025, arXiv 2510.14967). A tool is called as `<name>argument</name>` (`<search>query
    </search>`), its result comes back as `<information>...</information>`, and `<answer>...
    </answer>` ends the episode. Generation stops at each closing tag.
  - `chat_template`: the model's own tool-call format where its chat template has one, in the
    common JSON form `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Results go back as a
    `tool` message rendered by the chat template, so the turn's end and the next assistant header
    come from the template, not from us. The final answer is still `<answer>...</answer>`.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from llmrl.registry import Registry

PROTOCOLS: Registry[type["ToolProtocol"]] = Registry("tool protocol")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Action:
    """What one assistant turn asked for: tool calls, a final answer, or neither (a turn that
    follows no protocol ends the episode unanswered)."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    answer: str | None = None
    malformed: str | None = None  # why a call could not be parsed (a bad JSON tool call)


class ToolProtocol(ABC):
    def __init__(self, tool_names: list[str], tokenizer: Any) -> None:
        self.tool_names = tool_names
        self.tokenizer = tokenizer

    @property
    @abstractmethod
    def stop(self) -> list[str]:
        """Stop strings that end an assistant turn."""

    @abstractmethod
    def parse(self, turn_text: str) -> Action:
        """The action of one assistant turn's text."""

    @abstractmethod
    def observation_text(self, results: list[str]) -> str:
        """The text that follows the turn: the results of its calls (and any framing)."""

    def observation_ids(self, results: list[str]) -> list[int]:
        return self.tokenizer.encode(self.observation_text(results), add_special_tokens=False)

    def prompt_ids(self, task: Any, tools: list[Any]) -> list[int]:
        """The episode's first tokens; the task's own prompt unless the protocol templates tools in."""
        return list(task.prompt_ids)


def final_answer(text: str) -> str | None:
    """The text of the last `<answer>...</answer>`, or None."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


@PROTOCOLS.register("tags")
class TagProtocol(ToolProtocol):
    OPEN_INFO, CLOSE_INFO = "\n<information>", "</information>\n"

    @property
    def stop(self) -> list[str]:
        return [f"</{name}>" for name in self.tool_names] + [ANSWER_CLOSE]

    def parse(self, turn_text: str) -> Action:
        answer = final_answer(turn_text)
        if answer is not None:
            return Action(answer=answer)
        calls = []
        for name in self.tool_names:
            for argument in re.findall(rf"<{re.escape(name)}>(.*?)</{re.escape(name)}>", turn_text, re.DOTALL):
                calls.append((name, {"query": argument.strip()}))
        return Action(calls=calls[-1:])  # one call per turn: the stop string ends the turn at the first

    def observation_text(self, results: list[str]) -> str:
        return tag_observation("\n".join(results))


def tag_observation(result: str) -> str:
    """How the tag protocol shows a tool result (also what warm-start demonstrations contain)."""
    return f"{TagProtocol.OPEN_INFO}{result}{TagProtocol.CLOSE_INFO}"


@PROTOCOLS.register("chat_template")
class ChatTemplateProtocol(ToolProtocol):
    CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
    _MARK_A, _MARK_R = "\x00ASSISTANT\x00", "\x00RESULT\x00"

    def __init__(self, tool_names: list[str], tokenizer: Any) -> None:
        super().__init__(tool_names, tokenizer)
        self._frame = self._observation_frame()

    @property
    def stop(self) -> list[str]:
        return [self.CALL_CLOSE, ANSWER_CLOSE]

    def parse(self, turn_text: str) -> Action:
        answer = final_answer(turn_text)
        if answer is not None:
            return Action(answer=answer)
        found = re.findall(rf"{self.CALL_OPEN}(.*?){self.CALL_CLOSE}", turn_text, re.DOTALL)
        if not found:
            return Action()
        try:
            call = json.loads(found[-1])
            name, arguments = call["name"], call.get("arguments", {})
            if isinstance(arguments, str):  # some templates emit the arguments as a JSON string
                arguments = json.loads(arguments)
            if not isinstance(arguments, dict):
                raise TypeError("arguments is not an object")
        except (ValueError, KeyError, TypeError) as err:
            return Action(malformed=f"bad tool call {found[-1][:80]!r}: {err}")
        return Action(calls=[(str(name), arguments)])

    def observation_text(self, results: list[str]) -> str:
        return self._frame.replace(self._MARK_R, "\n".join(results))

    def _observation_frame(self) -> str:
        """Everything the chat template writes between an assistant message's content and the next
        assistant message's content when a tool message sits between them: found by rendering a
        marked conversation, so it is right for whatever template the model has."""
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": self._MARK_A},
            {"role": "tool", "content": self._MARK_R},
        ]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self._MARK_A not in rendered or self._MARK_R not in rendered:
            raise ValueError("protocol chat_template: the model's chat template does not render tool messages; use protocol: tags")
        return rendered[rendered.index(self._MARK_A) + len(self._MARK_A) :]

    def prompt_ids(self, task: Any, tools: list[Any]) -> list[int]:
        from llmrl.data.prompts import tokenize_prompt

        return tokenize_prompt(self.tokenizer, task.messages, tools=[tool.schema() for tool in tools])
