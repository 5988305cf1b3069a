"""Reward for the built-in synthetic arithmetic task (gold: an integer string such as "-17")."""
from __future__ import annotations

from llmrl.reward import register_reward
from llmrl.reward.builtin.gsm8k import gold_answer, last_marked_number, last_number, numbers_match
from llmrl.types import Task


def arithmetic_answer(text: str) -> str | None:
    """The number after the last `####` when there is one, else the last number in the text.

    The whole completion is searched: answers are short, and a small model that has not yet
    learned the `####` format should still be graded on the number it wrote last.
    """
    marked = last_marked_number(text)
    return marked if marked is not None else last_number(text)


@register_reward("arithmetic", needs_answer=True)
def arithmetic(completion: str, task: Task) -> dict[str, float]:
    """1 when the answer equals the gold by value ("7.0" matches "7"), else 0."""
    correct = numbers_match(arithmetic_answer(completion), gold_answer(task))
    return {"score": float(correct), "acc": float(correct)}
