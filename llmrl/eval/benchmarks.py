"""Benchmarks: a registry of named evaluation sets, and how their items become prompts.

A benchmark names a data task type (so rows are read exactly as training reads them), the
reward that grades it (the same function training uses), where its rows come from, and its
generation budget. Answer readers, keyed by reward name, pull the answer out of a completion
for samples.jsonl and give the key that maj@k votes on.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmrl.data import DataConfig, build_tasks, get_task_type
from llmrl.data.prompts import render_prompt
from llmrl.data.sources import FILE_BUILDERS
from llmrl.registry import Registry
from llmrl.reward.builtin.arithmetic import arithmetic_answer
from llmrl.reward.builtin.gsm8k import canonical_number, gsm8k_extract
from llmrl.reward.builtin.math import extract_last_boxed
from llmrl.types import Task


class EvalError(ValueError):
    """An evaluation setting that cannot be used; the message names the flag or key."""


# ---------------------------------------------------------------- answer readers


@dataclass(frozen=True)
class AnswerReader:
    """How to read a graded answer: `extract` finds it in a completion, `vote_key` normalises
    it so that equal answers written differently vote together in maj@k."""

    extract: Callable[[str], str | None]
    vote_key: Callable[[str], str] = lambda answer: answer


ANSWER_READERS: Registry[AnswerReader] = Registry("answer reader")  # by reward name


def register_answer_reader(reward_name: str, reader: AnswerReader) -> None:
    ANSWER_READERS.register(reward_name, reader)


_LATEX_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\$|\^\{?\\circ\}?|\s+")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalise_math_answer(answer: str) -> str:
    """A string normal form for voting on MATH answers (no sympy: voting must stay fast).

    Drops spacing commands, `\\left`/`\\right`, `$`, degree marks and all whitespace; unwraps
    `\\text{}`; maps `\\dfrac`/`\\tfrac` to `\\frac`; strips a trailing period; and writes plain
    numbers canonically (`1,000.50` -> `1000.5`). Forms that are equal only mathematically
    (`\\frac12` and `0.5`) stay apart: they split the vote, but grading itself uses math-verify.
    """
    text = _TEXT_COMMAND.sub(r"\1", answer)
    text = _LATEX_NOISE.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.rstrip(".")
    number = canonical_number(text)
    return number if number is not None else text


register_answer_reader("gsm8k", AnswerReader(lambda text: gsm8k_extract(text, "strict")))
register_answer_reader("gsm8k_flexible", AnswerReader(lambda text: gsm8k_extract(text, "flexible")))
register_answer_reader("math", AnswerReader(extract_last_boxed, normalise_math_answer))
register_answer_reader("arithmetic", AnswerReader(arithmetic_answer))


# ---------------------------------------------------------------- the registry


def _gsm8k_shot_answer(task: Task) -> str:
    # The reference solution without its `<<48/2=24>>` calculator annotations; ends `#### N`.
    return re.sub(r"<<[^>]*>>", "", str(task.meta["solution"])).strip()


def _arithmetic_shot_answer(task: Task) -> str:
    return f"{task.meta['expression']} = {task.answer}\n#### {task.answer}"


@dataclass(frozen=True)
class Benchmark:
    name: str
    task_type: str  # DataConfig.type: how rows are read and the gold answer found
    reward: str  # the reward function that grades it
    max_new_tokens: int
    hub_id: str | None = None  # loaded by name when no data_dir is given
    file: str | None = None  # a user's own file instead of a hub id or data root
    split: str = "test"
    instruction: str | None = None  # None: the task type's default instruction
    breakdown: tuple[str, ...] = ()  # Task.meta keys with a pass@1 per value
    fewshot_split: str | None = None  # where few-shot examples come from
    few_shot: int = 0  # worked examples by default
    shot_answer: Callable[[Task], str] | None = None  # a worked answer for a few-shot example
    data_options: dict[str, Any] = field(default_factory=dict)  # extra DataConfig settings


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def register_benchmark(bench: Benchmark) -> Benchmark:
    return BENCHMARKS.register(bench.name, bench)


register_benchmark(
    Benchmark(
        name="gsm8k",
        task_type="gsm8k",
        reward="gsm8k",
        max_new_tokens=256,
        hub_id="openai/gsm8k",
        fewshot_split="train",
        shot_answer=_gsm8k_shot_answer,
        # Zero-shot, SmolLM2-135M-Instruct wrote a '####' line in about half of its answers (the
        # rest rambled past 256 tokens or ended "The answer is ..."); two worked examples made
        # it write one every time, with answers a third as long.
        few_shot=2,
    )
)
register_benchmark(
    Benchmark(
        name="math500",
        task_type="math",
        reward="math",
        max_new_tokens=1024,
        hub_id="HuggingFaceH4/MATH-500",
        breakdown=("subject", "level"),
    )
)
register_benchmark(
    Benchmark(
        name="arithmetic",
        task_type="arithmetic",
        reward="arithmetic",
        max_new_tokens=64,
        fewshot_split="train",
        shot_answer=_arithmetic_shot_answer,
        data_options={"num_test": 200},
    )
)


def _looks_like_file(spec: str) -> bool:
    return Path(spec).suffix in FILE_BUILDERS or Path(spec).expanduser().is_file()


def check_bench_name(spec: str) -> None:
    """Raise EvalError unless `spec` is a registered benchmark or looks like a data file."""
    if spec not in BENCHMARKS and not _looks_like_file(spec):
        known = ", ".join(sorted(BENCHMARKS))
        raise EvalError(
            f"unknown benchmark {spec!r} (built-in: {known}; or a path to a {'/'.join(FILE_BUILDERS)} file)"
        )


def resolve_bench(spec: str, reward: str | None = None) -> Benchmark:
    """The benchmark a `--bench` item names; a file becomes a generic benchmark graded by `reward`."""
    check_bench_name(spec)
    if spec in BENCHMARKS:
        bench = BENCHMARKS[spec]
        return replace(bench, reward=reward) if reward else bench
    if reward is None:
        raise EvalError(f"--bench {spec}: a benchmark file needs --reward NAME to grade it")
    return Benchmark(name=Path(spec).stem, task_type="generic", reward=reward, max_new_tokens=512, file=spec)


# ---------------------------------------------------------------- items and prompts


@dataclass
class BenchTasks:
    """A benchmark's items, rendered as prompts, with what identifies them in the results."""

    bench: Benchmark
    tasks: list[Task]
    source: str  # where the rows came from (file path, hub id, generator)
    file_sha256: str | None  # of the source file, when it is a local file
    items_sha256: str  # of every item's id, gold answer and prompt tokens: what was evaluated
    prompt_format: dict[str, Any]

    def labels(self, key: str) -> dict[str, str]:
        """task id -> str(meta[key]) for the items that have it (e.g. MATH subject)."""
        return {t.task_id: str(t.meta[key]) for t in self.tasks if t.meta.get(key) is not None}


def data_config(bench: Benchmark, cfg: Any, split: str, limit: int | None) -> DataConfig:
    """The data section that loads `bench`: the same task types and loaders as training."""
    if bench.file is not None:
        path = bench.file
    elif cfg.data_dir is not None:
        path = cfg.data_dir
    else:
        path = bench.hub_id
    values: dict[str, Any] = {
        "type": bench.task_type,
        "path": path,
        "split": split,
        "eval_split": split,
        "fields": dict(cfg.fields) if bench.file is not None else {},
        "instruction": cfg.instruction if cfg.instruction is not None else bench.instruction,
        "system_prompt": cfg.system_prompt,
        # A benchmark is scored over all of its items: none may be skipped as too long or bad.
        "max_prompt_tokens": 1_000_000,
        "max_bad_fraction": 0.0,
        "limit": limit,
    }
    values |= bench.data_options | cfg.data_options.get(bench.name, {})
    try:
        return DataConfig(**values)
    except ValidationError as err:  # a bad --data-option key or value
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise EvalError(f"--data-option {bench.name}.{key}: {first['msg']}") from None


def load_bench_tasks(bench: Benchmark, tokenizer: Any, cfg: Any) -> BenchTasks:
    """Load the benchmark's items and render their prompts as `cfg` asks (chat template or
    plain text, instruction, system prompt, few-shot examples)."""
    split = cfg.split or bench.split
    data_cfg = data_config(bench, cfg, split, cfg.limit)
    from llmrl.reward import reward_needing_answer

    taskset = build_tasks(data_cfg, tokenizer, split=split, graded_by=reward_needing_answer([bench.reward]))
    num_shots = cfg.few_shot if cfg.few_shot is not None else bench.few_shot
    shots = few_shot_messages(bench, tokenizer, cfg, num_shots)
    tasks = taskset.tasks
    if shots or not cfg.chat_template:
        for task in tasks:
            task.messages = insert_shots(task.messages, shots)
            task.prompt_ids = render_prompt(tokenizer, task.messages, cfg.chat_template)
    instruction = data_cfg.instruction if data_cfg.instruction is not None else get_task_type(bench.task_type).instruction
    prompt_format = {
        "chat_template": cfg.chat_template,
        "instruction": instruction or "",
        "system_prompt": cfg.system_prompt,
        "few_shot": num_shots,
        "example": tokenizer.decode(tasks[0].prompt_ids) if tasks else "",
    }
    source = Path(taskset.source)
    return BenchTasks(
        bench=bench,
        tasks=tasks,
        # a generated source names no file, so the split is part of it (a resume must not mix splits)
        source=str(source.resolve()) if source.is_file() else f"{taskset.source}, split {split}",
        file_sha256=file_sha256(source) if source.is_file() else None,
        items_sha256=items_sha256(tasks),
        prompt_format=prompt_format,
    )


def few_shot_messages(bench: Benchmark, tokenizer: Any, cfg: Any, num_shots: int) -> list[dict[str, str]]:
    """User/assistant turns of the first `num_shots` items of the benchmark's training split."""
    if num_shots == 0:
        return []
    if bench.fewshot_split is None or bench.shot_answer is None:
        raise EvalError(f"--few-shot: benchmark {bench.name!r} has no split to draw worked examples from")
    shot_cfg = data_config(bench, cfg, bench.fewshot_split, num_shots)
    shot_tasks = build_tasks(shot_cfg, tokenizer, split=bench.fewshot_split).tasks
    messages: list[dict[str, str]] = []
    for shot in shot_tasks:
        messages.append({"role": "user", "content": shot.messages[-1]["content"]})
        messages.append({"role": "assistant", "content": bench.shot_answer(shot)})
    return messages


def insert_shots(messages: list[dict[str, str]], shots: list[dict[str, str]]) -> list[dict[str, str]]:
    """The shots go after a leading system message and before the problem's turn."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    return messages[:head] + shots + messages[head:]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def items_sha256(tasks: list[Task]) -> str:
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(json.dumps([task.task_id, task.answer, task.prompt_ids]).encode())
    return digest.hexdigest()
