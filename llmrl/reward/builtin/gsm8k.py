"""GSM8K answer extraction and rewards.

Follows verl's `gsm8k.py` reward function (verl/utils/reward_score/gsm8k.py; GSM8K: Cobbe et
al. 2021, arXiv 2110.14168) where it is sound: only the last 300 characters are searched, the
strict mode reads the number after `####` and the last match wins. It departs from verl where
verl's string compare rejects a correct answer: numbers are compared by value, so `#### 1,234`,
`#### $42` and `#### 42.0` all match gold `1234` / `42`.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from llmrl.reward import register_reward
from llmrl.types import Task

# verl gsm8k.py: only the tail is searched, so an early `####` in restated work is ignored.
TAIL_CHARS = 300

# A number with optional thousands commas and decimals ("1,234.5", ".5", "-17"). A trailing
# sentence period is not part of it ("42." reads as 42).
_DIGITS = r"(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
# Strict: `####`, optional blanks (none at all is accepted too), optional `$`, the number.
_MARKED_NUMBER = re.compile(r"####[ \t]*\$?[ \t]*(-?" + _DIGITS + ")")
# Flexible: any number; a minus sign counts only where it cannot be subtraction ("10-17" → 17).
_ANY_NUMBER = re.compile(r"(?:(?<![\w.)\]}])-)?\$?" + _DIGITS)

ExtractMode = Literal["strict", "flexible"]


def canonical_number(text: str) -> str | None:
    """`text` as a plain number string: no commas or `$`, no trailing zeros ("1,234.50" → "1234.5").

    None when it is not a number. Equal values give equal strings, so the result can be used as
    a majority-vote key.
    """
    cleaned = text.strip().replace(",", "").replace("$", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_marked_number(text: str) -> str | None:
    """The number after the last `####` in `text` (canonical form), or None."""
    matches = _MARKED_NUMBER.findall(text)
    return canonical_number(matches[-1]) if matches else None


def last_number(text: str) -> str | None:
    """The last number anywhere in `text` (canonical form), or None."""
    matches = _ANY_NUMBER.findall(text)
    return canonical_number(matches[-1]) if matches else None


def gsm8k_extract(text: str, mode: ExtractMode = "strict") -> str | None:
    """The final answer of a GSM8K completion, in canonical number form, or None.

    `strict`: the number after the last `####` in the last 300 characters. `flexible`: the last
    number in the last 300 characters.
    """
    tail = text[-TAIL_CHARS:]
    if mode == "strict":
        return last_marked_number(tail)
    if mode == "flexible":
        return last_number(tail)
    raise ValueError(f"gsm8k_extract mode must be 'strict' or 'flexible', got {mode!r}")


def numbers_match(answer: str | None, gold: str) -> bool:
    """Compare by value when both are numbers; otherwise compare the cleaned strings."""
    if answer is None:
        return False
    gold_number = canonical_number(gold)
    if gold_number is None:  # a non-numeric gold: fall back to exact text
        return answer.strip() == gold.strip().replace(",", "")
    return canonical_number(answer) == gold_number


def gold_answer(task: Task) -> str:
    if task.answer is None or not str(task.answer).strip():
        raise ValueError(f"task {task.task_id!r} has no gold answer to grade against")
    return str(task.answer)


def _grade(completion: str, task: Task, mode: ExtractMode, format_score: float) -> dict[str, float]:
    gold = gold_answer(task)
    answer = gsm8k_extract(completion, mode)
    if answer is None:
        return {"score": 0.0, "acc": 0.0}
    if numbers_match(answer, gold):
        return {"score": 1.0, "acc": 1.0}
    # verl gsm8k.py: an extracted but wrong answer earns `format_score` (0 by default).
    return {"score": format_score, "acc": 0.0}


@register_reward("gsm8k", needs_answer=True)
def gsm8k(completion: str, task: Task, format_score: float = 0.0) -> dict[str, float]:
    """1 when the number after the last `####` (last 300 chars) equals the gold by value."""
    return _grade(completion, task, "strict", format_score)


@register_reward("gsm8k_flexible", needs_answer=True)
def gsm8k_flexible(completion: str, task: Task, format_score: float = 0.0) -> dict[str, float]:
    """1 when the last number in the last 300 characters equals the gold by value."""
    return _grade(completion, task, "flexible", format_score)
