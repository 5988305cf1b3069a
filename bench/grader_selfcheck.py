"""Grader self-consistency: do the built-in rewards agree with the benchmarks' own references?

For GSM8K (1319) and MATH-500 (500), each item's reference solution is graded as if it were a
completion, first against its own gold answer (should be ~100%), then against the gold answer
of another item under a fixed derangement (should be ~0%). Prints the figures and every miss.

    .venv/bin/python bench/grader_selfcheck.py [--data ../shared/data] [--workers 0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmrl.eval.benchmarks import load_bench_tasks, resolve_bench
from llmrl.eval.config import EvalConfig
from llmrl.eval.harness import grader_selfcheck
from llmrl.models import load_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data root with gsm8k/ and math500/")
    parser.add_argument("--workers", type=int, default=0, help="reward worker processes (0 = in this process)")
    args = parser.parse_args()
    tokenizer = load_tokenizer("tiny")  # only to build prompt ids; grading never uses them
    print(f"{'bench':<8} {'items':>5} {'own gold':>9} {'shuffled':>9} {'seconds':>8}")
    for name in ("gsm8k", "math500"):
        bench_tasks = load_bench_tasks(resolve_bench(name), tokenizer, EvalConfig(benches=[name], data_dir=args.data))
        start = time.perf_counter()
        own = set(grader_selfcheck(bench_tasks, num_workers=args.workers))
        shuffled = grader_selfcheck(bench_tasks, shuffled=True, num_workers=args.workers)
        seconds = time.perf_counter() - start
        total = len(bench_tasks.tasks)
        print(f"{name:<8} {total:>5} {len(own) / total:>9.2%} {len(shuffled) / total:>9.2%} {seconds:>8.1f}")
        for task in bench_tasks.tasks:
            if task.task_id not in own:
                print(f"  miss (own gold) {task.task_id}: gold {task.answer!r}, reference ends {str(task.meta['solution'])[-80:]!r}")
        for task_id in shuffled:
            print(f"  hit (shuffled gold) {task_id}")


if __name__ == "__main__":
    main()
