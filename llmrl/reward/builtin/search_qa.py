"""Outcome reward for search agents: token F1 of the final `<answer>` against the gold answers, with
a format penalty, as IGPO scores the final turn (Wang et al. 2025, arXiv 2510.14967; the F1 is
SQuAD's bag-of-words F1, Rajpurkar et al. 2016)."""
from __future__ import annotations

import re
import string
from collections import Counter

from llmrl.reward import register_reward
from llmrl.tools.protocols import final_answer
from llmrl.types import Task

PROTOCOL_TAGS = ("answer", "search", "information", "tool_call")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> list[str]:
    """Lower-cased words with punctuation removed."""
    return text.lower().translate(_PUNCTUATION).split()


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def tags_balanced(text: str) -> bool:
    return all(text.count(f"<{tag}>") == text.count(f"</{tag}>") for tag in PROTOCOL_TAGS)


def gold_answers(task: Task) -> list[str]:
    golds = task.meta.get("answers") or ([task.answer] if task.answer else [])
    return [str(g) for g in golds]


@register_reward("search_f1", needs_answer=True)
def search_f1(completion: str, task: Task, format_penalty: float = -2.0) -> dict[str, float]:
    """F1 of the last <answer> against the best gold; `format_penalty` (IGPO: -2) when there is no
    answer or a protocol tag is unbalanced. Parts: f1, acc (exact match after normalisation),
    answered (an <answer> was given)."""
    answer = final_answer(completion)
    golds = gold_answers(task)
    if answer is None or not tags_balanced(completion) or not golds:
        return {"score": format_penalty, "f1": 0.0, "acc": 0.0, "answered": float(answer is not None)}
    f1 = max(token_f1(answer, gold) for gold in golds)
    exact = any(normalize_answer(answer) == normalize_answer(gold) for gold in golds)
    return {"score": f1, "f1": f1, "acc": float(exact), "answered": 1.0}
