"""Chat messages for a problem, and their token ids: under the tokenizer's chat template, or as
plain text for base models. Training (`data.chat_template`) and evaluation (`eval.chat_template`,
`llmrl eval --no-chat-template`) render prompts here, so both see the same format."""
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


def plain_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """Messages as plain text for a model without a chat template: turns separated by blank
    lines, the problem's turn last, ending in a newline where the answer begins."""
    return "\n\n".join(m["content"] for m in messages) + "\n"


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], chat_template: bool = True) -> list[int]:
    """Prompt token ids: the chat template's rendering, or the plain text with the tokenizer's
    own special tokens (a BOS where the model expects one)."""
    if chat_template:
        return tokenize_prompt(tokenizer, messages)
    return [int(t) for t in tokenizer(plain_prompt(messages), add_special_tokens=True)["input_ids"]]


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
