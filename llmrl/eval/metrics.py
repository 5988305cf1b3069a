"""Evaluation metrics over graded samples: pass@k, maj@k, length and truncation, breakdowns.

Pure functions over plain values, so each one is checked against hand-computed numbers.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import comb


@dataclass(frozen=True)
class GradedSample:
    """One completion after grading: what the metrics need and nothing else."""

    task_id: str
    sample: int  # index within the item's n samples
    correct: bool
    answer: str | None  # normalised extracted answer (the vote key); None when none was found
    response_tokens: int
    truncated: bool


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with c correct out of n samples: 1 - C(n-c, k) / C(n, k).

    The chance that k samples drawn without replacement from the n contain a correct one.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every draw of k samples includes a correct one
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def powers_of_two_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n: the k values pass@k is reported for."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Samples without an answer do not vote. A tie goes to the answer that appeared first (lowest
    sample index): deterministic, and with greedy-first orderings it favours the earliest sample.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    for index, answer in enumerate(answers):
        if answer is not None and counts[answer] == top:
            return index
    return None  # unreachable: some answer has the top count


def majority_correct(samples: Sequence[GradedSample]) -> bool:
    """Whether the majority answer of these samples is correct (the verdict of its first sample)."""
    winner = majority_answer([s.answer for s in samples])
    return winner is not None and samples[winner].correct


def group_by_item(samples: Iterable[GradedSample]) -> dict[str, list[GradedSample]]:
    """Samples per task id, each list ordered by sample index."""
    items: dict[str, list[GradedSample]] = defaultdict(list)
    for sample in samples:
        items[sample.task_id].append(sample)
    return {task_id: sorted(group, key=lambda s: s.sample) for task_id, group in items.items()}


def accuracy_metrics(items: dict[str, list[GradedSample]]) -> dict[str, float]:
    """pass@1 (mean over all samples), pass@k for powers of two k <= n, maj@k for k >= 2.

    maj@k votes over each item's first k samples; it is reported for the powers of two and for
    n itself. Items may have different n (never in a finished run); k goes up to the smallest.
    """
    if not items:
        return {}
    all_samples = [s for group in items.values() for s in group]
    metrics = {"pass@1": sum(s.correct for s in all_samples) / len(all_samples)}
    n_min = min(len(group) for group in items.values())
    for k in powers_of_two_up_to(n_min)[1:]:
        metrics[f"pass@{k}"] = _mean(pass_at_k(len(g), sum(s.correct for s in g), k) for g in items.values())
    for k in sorted(set(powers_of_two_up_to(n_min)[1:]) | ({n_min} if n_min > 1 else set())):
        metrics[f"maj@{k}"] = _mean(float(majority_correct(g[:k])) for g in items.values())
    return metrics


def sample_metrics(samples: Sequence[GradedSample]) -> dict[str, float]:
    """Response length in tokens, the share cut off by the length limit, and the share with an
    extracted answer (low means the prompt and the extractor disagree on the answer format)."""
    if not samples:
        return {}
    return {
        "response_tokens_mean": _mean(s.response_tokens for s in samples),
        "truncated_frac": _mean(float(s.truncated) for s in samples),
        "extracted_frac": _mean(float(s.answer is not None) for s in samples),
    }


def breakdown(items: dict[str, list[GradedSample]], labels: dict[str, str]) -> dict[str, dict[str, float]]:
    """pass@1 and item count per label value (e.g. MATH subject), labels keyed by task id."""
    by_label: dict[str, list[GradedSample]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for task_id, group in items.items():
        label = labels.get(task_id)
        if label is None:
            continue
        by_label[label].extend(group)
        counts[label] += 1
    return {
        label: {"pass@1": _mean(float(s.correct) for s in by_label[label]), "items": float(counts[label])}
        for label in sorted(by_label, key=_natural_key)
    }


def _natural_key(label: str) -> tuple[int, float, str]:
    # Numeric labels (MATH levels "1".."5") by value, before text labels in alphabetical order.
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
