"""`EvalConfig`: what to evaluate and how, for `llmrl eval` and for evaluation during training.

One section serves both, so the offline command and the training loop run the same harness with
the same settings and their numbers can be compared.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from llmrl.config_base import Section


class EvalConfig(Section):
    every: int | None = Field(
        None,
        ge=0,
        description=(
            "Training: evaluate every N steps. Unset: only after the last step (see `at_end`). 0: never evaluate "
            "during training, the last step included, whatever `at_end` says."
        ),
    )
    at_end: bool = Field(
        True, description="Training: also evaluate after the last step (when `benches` is not empty and `every` is not 0)."
    )
    benches: list[str] = Field(
        default_factory=list,
        description=(
            "Benchmarks: built-in names (gsm8k, math500, arithmetic) or paths to .jsonl/.json/.parquet "
            "files (graded with `reward`). Empty: no evaluation."
        ),
    )
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items of each benchmark.")
    split: str | None = Field(
        None,
        description="Dataset split to evaluate. Unset: each benchmark's held-out split (test). `train` finds the training "
        "problems a model cannot solve, for POPE's hard_file.",
    )
    n: int = Field(1, ge=1, description="Samples per item. pass@k is reported for every power of two k <= n.")
    temperature: float | None = Field(
        None,
        ge=0,
        description="Sampling temperature. Unset: 0 (greedy) when n = 1, else 1.0. n > 1 at temperature 0 is an error.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Generation budget per sample. Unset: the benchmark's own (gsm8k 256, math500 1024, arithmetic 64)."
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings: a sample ends when its text contains one (EOS always ends it). Empty: none, as for "
        "every built-in benchmark. A recipe whose rollout.stop shapes the answers sets the same here to grade them alike.",
    )
    data_dir: str | None = Field(
        None,
        description=(
            "Local data root holding gsm8k/test.jsonl and math500/test.jsonl. Unset: benchmarks load "
            "from the hub by name (openai/gsm8k, HuggingFaceH4/MATH-500)."
        ),
    )
    reward: str | None = Field(
        None,
        description="Reward that grades file benchmarks (required for them); also overrides the built-in benchmarks' own.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="File benchmarks: task key -> column (`prompt`, `answer`, `id`), as in data.fields. Default prompt/answer/id.",
    )
    data_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "Per-benchmark data settings merged into its data section, e.g. "
            "{arithmetic: {difficulty: 2, num_test: 500}} to match a recipe's arithmetic task."
        ),
    )
    instruction: str | None = Field(
        None,
        description="Instruction added to each problem ({problem} placeholder or appended). Unset: the benchmark's default; '' = none.",
    )
    system_prompt: str | None = Field(None, description="System message before the problem. Unset: none.")
    chat_template: bool = Field(
        True, description="Render prompts with the tokenizer's chat template; false gives plain text (for base models)."
    )
    few_shot: int | None = Field(
        None,
        ge=0,
        description=(
            "Worked examples put before each problem, from the benchmark's training split. Unset: the "
            "benchmark's default (gsm8k 2, which a 135M model needs to write the '####' answer line; others 0)."
        ),
    )
    batch_size: int = Field(
        32, ge=1, description="Samples generated per engine call; samples.jsonl is appended and flushed after each."
    )
    seed: int = Field(0, description="Sampling seed (n > 1 or temperature > 0).")
    reward_workers: int = Field(
        1, ge=0, description="Reward worker processes (0 grades in this process: no timeout, for tests)."
    )
    progress: bool = Field(True, description="Show a progress bar over samples.")

    @field_validator("temperature")
    @classmethod
    def _greedy_needs_one_sample(cls, value: float | None, info: ValidationInfo) -> float | None:
        n = info.data.get("n", 1)
        if value == 0 and n > 1:
            raise ValueError(
                f"temperature 0 (greedy) with n={n} gives {n} identical samples; use a temperature above 0 or n=1"
            )
        return value

    @field_validator("benches")
    @classmethod
    def _benches_exist(cls, value: list[str]) -> list[str]:
        from llmrl.eval.benchmarks import check_bench_name

        for name in value:
            check_bench_name(name)
        return value

    @property
    def sampling_temperature(self) -> float:
        """The temperature actually used: greedy for one sample, 1.0 for several, unless set."""
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.n == 1 else 1.0


__all__ = ["EvalConfig"]
