"""Evaluation: benchmarks (gsm8k, math500, arithmetic, files), pass@k / maj@k, and the harness
shared by `llmrl eval` and evaluation during training."""
from llmrl.eval.benchmarks import BENCHMARKS, Benchmark, EvalError, register_benchmark
from llmrl.eval.config import EvalConfig
from llmrl.eval.harness import evaluate_bench, evaluate_during_training, run_evaluation, should_evaluate
from llmrl.eval.metrics import majority_answer, pass_at_k

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "EvalConfig",
    "EvalError",
    "evaluate_bench",
    "evaluate_during_training",
    "majority_answer",
    "pass_at_k",
    "register_benchmark",
    "run_evaluation",
    "should_evaluate",
]
