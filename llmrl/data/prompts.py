"""Chat messages for a problem, and their token ids under the tokenizer's chat template."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PROBLEM_PLACEHOLDER = "{problem}"

Message = dict[str, str]


def apply_instruction(problem: str, instruction: str | None) -> str:
    """Wrap or extend the problem text. Plain `str.replace` rather than `str.format`: LaTeX
    instructions such as `\\boxed{}` contain braces that `format` would choke on."""
    if not instruction:
        return problem
    if PROBLEM_PLACEHOLDER in instruction:
        return instruction.replace(PROBLEM_PLACEHOLDER, problem)
    return f"{problem}\n\n{instruction}"


def build_messages(
    problem: str | Sequence[Mapping[str, str]],
    instruction: str | None = None,
    system_prompt: str | None = None,
) -> list[Message]:
    """[system?, user] for a text problem. A problem that is already a chat (a list of
    role/content messages) is kept, with the instruction added to its last user turn."""
    if isinstance(problem, str):
        messages = [{"role": "user", "content": apply_instruction(problem, instruction)}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in problem]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = apply_instruction(
            messages[last_user]["content"], instruction
        )
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def tokenize_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the chat with the assistant's generation prompt at the end; `tools` (function
    schemas) are rendered by templates that support them."""
    extra = {"tools": tools} if tools else {}
    encoded = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, **extra
    )
    # transformers 5 returns a BatchEncoding (a Mapping); older versions a bare list.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(token) for token in encoded]
