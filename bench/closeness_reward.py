"""A GSM8K reward with partial credit, for benchmarks that must see a learning signal.

SmolLM2-135M answers almost no GSM8K problem right, so with the exact-match `gsm8k` reward every
group of a short benchmark ties at 0, every advantage is 0 and no trainer's weights can move:
the benchmark cannot show that training happened. This reward keeps the exact answer's score of 1
and gives a wrong final number credit that falls with its relative distance from the gold one:

    score = 1                                   if the last number equals the gold answer
          = 0.5 / (1 + |x - gold| / max(1, |gold|))   for any other last number x
          = 0                                   with no number at all

Samples of one prompt almost always end on different numbers, so groups differ. llmrl loads it
by path (`reward.functions=[bench/closeness_reward.py:closeness]`); bench/vs_trl.py wraps the same
function for TRL, so both trainers optimise the same thing.
"""
from __future__ import annotations

from llmrl.reward.builtin.gsm8k import canonical_number, gold_answer, gsm8k_extract
from llmrl.types import Task


def closeness(completion: str, task: Task) -> float:
    gold = canonical_number(gold_answer(task))
    answer = gsm8k_extract(completion, "flexible")
    if gold is None or answer is None:
        return 0.0
    x, g = float(answer), float(gold)
    if x == g:
        return 1.0
    return 0.5 / (1.0 + abs(x - g) / max(1.0, abs(g)))
