"""Format reward: 1 when the completion matches a regular expression, else 0."""
from __future__ import annotations

import functools
import re

from llmrl.reward import register_reward
from llmrl.types import Task

# A final answer is present: `#### <number>` (the gsm8k/arithmetic convention) or a `\boxed{`.
DEFAULT_PATTERN = r"####[ \t]*\$?[ \t]*-?\.?\d|\\boxed\s*\{"


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@register_reward("format")
def format_reward(
    completion: str, task: Task, pattern: str = DEFAULT_PATTERN, fullmatch: bool = False
) -> float:
    """1.0 if `pattern` is found in the completion (or matches all of it with `fullmatch`).

    Plain `re` semantics: write `(?s)` in the pattern for `.` to cross newlines.
    """
    regex = _compiled(pattern)
    found = regex.fullmatch(completion) if fullmatch else regex.search(completion)
    return 1.0 if found else 0.0
