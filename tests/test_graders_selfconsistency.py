"""The real reward functions graded against the benchmarks' own reference solutions.

A reference solution graded against its own gold answer must pass; against another item's gold
answer (a fixed derangement that never hands an item an equal answer) it must fail. This catches
a gold answer read wrongly by the data layer as well as an extractor or comparison that is too
strict or too lenient. bench/grader_selfcheck.py prints the same figures.
"""
from pathlib import Path

import pytest

from llmrl.eval.benchmarks import load_bench_tasks, resolve_bench
from llmrl.eval.config import EvalConfig
from llmrl.eval.harness import grader_selfcheck

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def benches(tokenizer):
    def load(name):
        return load_bench_tasks(resolve_bench(name), tokenizer, EvalConfig(benches=[name], data_dir=str(SHARED_DATA)))

    return {name: load(name) for name in ("gsm8k", "math500")}


def test_gsm8k_reference_solutions_all_pass_their_own_gold(benches):
    tasks = benches["gsm8k"].tasks
    assert len(tasks) == 1319
    assert tasks[0].meta["solution"].endswith("#### 18")  # the full answer field is the reference
    assert len(grader_selfcheck(benches["gsm8k"])) == 1319


def test_math500_reference_solutions_pass_their_own_gold(benches):
    tasks = benches["math500"].tasks
    assert len(tasks) == 500
    passed = set(grader_selfcheck(benches["math500"]))
    misses = [t.task_id for t in tasks if t.task_id not in passed]
    assert len(passed) >= 495, misses  # at least 99%


@pytest.mark.parametrize("name, size", [("gsm8k", 1319), ("math500", 500)])
def test_shuffled_gold_answers_fail(benches, name, size):
    hits = grader_selfcheck(benches[name], shuffled=True)
    assert len(hits) <= size // 100, hits  # at most 1%
