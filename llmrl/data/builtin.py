"""Task types, and `build_tasks`: dataset rows -> `Task`s with templated prompt ids.

A task type says where its rows come from, which columns it reads by default, how the gold
answer is found, and what instruction follows the problem. Adding one is one decorated class;
`build_tasks` never branches on the type's name.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmrl.data.arithmetic import arithmetic_split, solution_steps
from llmrl.data.config import DataConfig, DataConfigError
from llmrl.data.prompts import build_messages, render_prompt
from llmrl.data.sources import Row, load_rows, row_location
from llmrl.registry import Registry
from llmrl.types import Task

ANSWER_MARKER = "####"
CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


class RowError(Exception):
    """A malformed row: skipped and counted under `reason`, fatal only in bulk."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class ParsedRow:
    problem: str | list[dict[str, str]]  # text, or a chat that is already in messages form
    answer: str | None
    row_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class TaskType:
    """Defaults shared by every type; subclasses override the class attributes and `gold`."""

    name: str = ""  # set by `register_task_type`
    default_fields: dict[str, str] = {"prompt": "prompt", "answer": "answer", "id": "id"}
    required_fields: frozenset[str] = frozenset({"prompt"})
    instruction: str | None = None
    subdirs: tuple[str, ...] = ()  # folders searched under a data-root directory
    hub_subsets: dict[str, str] = {}  # hub id -> the configuration that holds the data

    def load_rows(self, cfg: DataConfig, split: str) -> tuple[list[Row], str]:
        use_eval_path = split == cfg.eval_split and cfg.eval_path is not None
        key, path = ("data.eval_path", cfg.eval_path) if use_eval_path else ("data.path", cfg.path)
        if path is None:
            raise DataConfigError(
                f"data.path: task type {self.name!r} needs a file, directory or hub id"
            )
        subset = cfg.subset or self.hub_subsets.get(path)
        return load_rows(
            path, split, subdirs=self.subdirs, subset=subset, key=key, limit=cfg.limit
        )

    def parse(
        self, row: Mapping[str, Any], fields: Mapping[str, str], user_keys: set[str]
    ) -> ParsedRow:
        # Columns the user named are required; a type's optional defaults may be absent.
        values = extract_fields(row, fields, required=self.required_fields | user_keys)
        problem = check_problem(values.pop("prompt"))
        row_id = values.pop("id", None)
        answer = self.gold(values)
        return ParsedRow(problem, answer, None if row_id is None else str(row_id), values)

    def gold(self, values: dict[str, Any]) -> str | None:
        """The gold answer; pops the columns it consumes, what is left becomes Task.meta."""
        answer = values.pop("answer", None)
        return None if answer is None else str(answer).strip()


TASK_TYPES: Registry[TaskType] = Registry("task type")


def register_task_type(name: str) -> Callable[[type[TaskType]], type[TaskType]]:
    """Class decorator: registers one instance of the task type under `name`."""

    def register(cls: type[TaskType]) -> type[TaskType]:
        cls.name = name
        TASK_TYPES.register(name, cls())
        return cls

    return register


def get_task_type(name: str) -> TaskType:
    if name not in TASK_TYPES:
        raise DataConfigError(f"data.type: unknown task type {name!r}; choose one of {', '.join(task_type_names())}")
    return TASK_TYPES[name]


def task_type_names() -> list[str]:
    return TASK_TYPES.names()


# ---------------------------------------------------------------- row helpers


def extract_fields(
    row: Mapping[str, Any], fields: Mapping[str, str], required: frozenset[str] | set[str]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, column in fields.items():
        value = row.get(column)
        if value is not None:
            values[key] = value
        elif key in required:
            raise RowError("missing_field", f"column {column!r} (data.fields.{key}) is missing")
    return values


def check_problem(value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_prompt", "the prompt is empty")
        return value
    if isinstance(value, list) and value:
        if all(_is_message(m) for m in value) and any(m["role"] == "user" for m in value):
            return [{"role": m["role"], "content": m["content"]} for m in value]
        raise RowError("bad_chat", "a chat prompt needs role/content messages and a user turn")
    if isinstance(value, list):
        raise RowError("empty_prompt", "the prompt is an empty chat")
    raise RowError("bad_prompt", f"the prompt is a {type(value).__name__}, not text or a chat")


def _is_message(item: Any) -> bool:
    return (
        isinstance(item, Mapping)
        and isinstance(item.get("role"), str)
        and isinstance(item.get("content"), str)
    )


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` in `text`, braces matched: `\\frac{1}{2}` survives."""
    start = text.rfind("\\boxed")
    while start != -1:
        content = _braced_after(text, start + len("\\boxed"))
        if content is not None:
            return content.strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def _braced_after(text: str, position: int) -> str | None:
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    depth = 0
    for index in range(position, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[position + 1 : index]
    return None  # unbalanced


# ---------------------------------------------------------------- built-in types


@register_task_type("generic")
class GenericTask(TaskType):
    """Any dataset: `fields` picks the prompt, optional answer and id columns."""


@register_task_type("gsm8k")
class Gsm8kTask(TaskType):
    default_fields = {"prompt": "question", "answer": "answer"}
    required_fields = frozenset({"prompt", "answer"})
    instruction = (
        "Solve the problem step by step. Write the final answer as a number after '####'."
    )
    subdirs = ("gsm8k",)
    hub_subsets = {"openai/gsm8k": "main", "gsm8k": "main"}

    def gold(self, values: dict[str, Any]) -> str:
        solution = str(values.pop("answer"))
        values["solution"] = solution
        worked, marker, tail = solution.rpartition(ANSWER_MARKER)
        # the worked steps before the marker: what POPE may show a prefix of
        values.setdefault("oracle_solution", worked.strip())
        gold = tail.strip().replace(",", "")
        if not marker or not gold:
            raise RowError("no_answer", f"no final answer after {ANSWER_MARKER!r}")
        # CHORD/SFT's demonstration: the solution without GSM8K's calculator notes ("<<48/2=24>>"),
        # which no prompt asks for and a policy should not learn to write
        values.setdefault("expert_response", CALCULATOR_NOTE.sub("", solution).strip())
        return gold


@register_task_type("math")
class MathTask(TaskType):
    default_fields = {
        "prompt": "problem",
        "answer": "answer",
        "solution": "solution",
        "subject": "subject",
        "level": "level",
        "id": "unique_id",
    }
    instruction = "Solve the problem step by step. Put the final answer in \\boxed{}."
    subdirs = ("math500", "math", "MATH")

    def gold(self, values: dict[str, Any]) -> str:
        if values.get("solution"):
            values.setdefault("oracle_solution", str(values["solution"]))
            values.setdefault("expert_response", str(values["solution"]))
        answer = str(values.pop("answer", "")).strip()
        if answer:
            return answer
        boxed = last_boxed(str(values.get("solution", "")))
        if not boxed:
            raise RowError("no_answer", "no answer column and no \\boxed{} in the solution")
        return boxed


@register_task_type("arithmetic")
class ArithmeticTask(TaskType):
    """Generated in memory from `num_train`/`num_test`/`difficulty`/`data_seed`."""

    default_fields = {
        "prompt": "question",
        "answer": "answer",
        "id": "id",
        "expression": "expression",
        "oracle_solution": "oracle_solution",
        "expert_response": "oracle_solution",  # the worked solution ends in the "#### <number>" line asked for
    }
    instruction = "Solve it. End your reply with '#### <number>'."

    def load_rows(self, cfg: DataConfig, split: str) -> tuple[list[Row], str]:
        problems = arithmetic_split(
            split, cfg.num_train, cfg.num_test, cfg.difficulty, cfg.data_seed
        )
        rows = [
            {
                "id": f"arith-{split}-{index:05d}",
                "question": problem.question,
                "answer": str(problem.value),
                "expression": problem.expression,
                "oracle_solution": solution_steps(problem.expression),
            }
            for index, problem in enumerate(problems[: cfg.limit])
        ]
        return rows, f"arithmetic generator (difficulty {cfg.difficulty}, seed {cfg.data_seed})"


SEARCH_INSTRUCTION = (
    "Answer the question. You can look facts up: write <search>query</search> and the results come back "
    "between <information> and </information>. Search as often as you need. When you know the answer, write "
    "it as <answer>answer</answer>."
)


@register_task_type("qa")
class QaTask(TaskType):
    """Questions with one or more gold answers, for search agents: `question` and `golden_answers`
    (a list, or one string) by default, as the Search-R1 family's data has them. Every gold answer
    is kept in meta `answers`; the F1 reward takes the best match."""

    default_fields = {"prompt": "question", "answer": "golden_answers", "id": "id"}
    required_fields = frozenset({"prompt", "answer"})
    instruction = SEARCH_INSTRUCTION

    def gold(self, values: dict[str, Any]) -> str:
        golds = values.pop("answer")
        golds = [golds] if isinstance(golds, str) else list(golds)
        golds = [str(g).strip() for g in golds if str(g).strip()]
        if not golds:
            raise RowError("no_answer", "no gold answer")
        values["answers"] = golds
        return golds[0]


@register_task_type("multihop")
class MultihopTask(QaTask):
    """The generated multi-hop knowledge-base questions (llmrl/data/multihop.py): no download; the
    search tool's built-in corpus `multihop` holds the facts. Each task carries a demonstration of
    the tag protocol in meta `expert_turns`, for warm starts."""

    default_fields = {"prompt": "question", "answer": "answer", "id": "id", "expert_turns": "expert_turns"}

    def load_rows(self, cfg: DataConfig, split: str) -> tuple[list[Row], str]:
        from llmrl.data.multihop import multihop_rows

        return multihop_rows(split, cfg.limit), "multi-hop knowledge-base generator"


# ---------------------------------------------------------------- building a task set


@dataclass
class TaskSet:
    tasks: list[Task]
    kind: str  # the task type's name: picks the default reward
    split: str
    source: str  # where the rows came from, for logs and errors
    stats: dict[str, int]  # rows, kept, skipped, and one count per skip reason

    def __len__(self) -> int:
        return len(self.tasks)


class SkippedRows:
    """Counts malformed rows by reason and remembers the first, for the error message."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.first: tuple[int, RowError] | None = None

    def add(self, index: int, error: RowError) -> None:
        self.by_reason[error.reason] += 1
        if self.first is None:
            self.first = (index, error)

    def stats(self, total: int) -> dict[str, int]:
        skipped = sum(self.by_reason.values())
        return {"rows": total, "kept": total - skipped, "skipped": skipped, **self.by_reason}

    def check(self, total: int, max_bad_fraction: float, source: str) -> None:
        if total == 0:
            raise DataConfigError(f"data.path: {source} has no rows")
        skipped = sum(self.by_reason.values())
        if skipped == 0 or (skipped < total and skipped / total <= max_bad_fraction):
            return
        index, error = self.first  # type: ignore[misc]
        counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.by_reason.items()))
        raise DataConfigError(
            f"data.max_bad_fraction: {skipped} of {total} rows of {source} are malformed "
            f"({skipped / total:.1%} > {max_bad_fraction:.1%}; {counts}); "
            f"the first is {row_location(source, index)}: {error}"
        )


def build_tasks(cfg: DataConfig, tokenizer: Any, split: str = "train", *, graded_by: str | None = None) -> TaskSet:
    """Load `split`, turn each row into a Task with prompt ids, and skip malformed rows
    (failing when more than `cfg.max_bad_fraction` of them are). `graded_by`: the reward that
    grades against the gold answer, which makes a row without one malformed."""
    task_type = get_task_type(cfg.type)
    rows, source = task_type.load_rows(cfg, split)
    fields = {**task_type.default_fields, **cfg.fields}
    instruction = task_type.instruction if cfg.instruction is None else cfg.instruction
    tasks: list[Task] = []
    skipped = SkippedRows()
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        try:
            parsed = task_type.parse(row, fields, set(cfg.fields))
            if graded_by is not None and (parsed.answer is None or not parsed.answer.strip()):
                column = fields.get("answer", "answer")
                raise RowError(
                    "no_answer", f"no gold answer (column {column!r}, data.fields.answer), which reward {graded_by!r} grades against"
                )
            task_id = parsed.row_id or f"{task_type.name}-{split}-{index:05d}"
            if task_id in seen_ids:
                raise RowError("duplicate_id", f"task id {task_id!r} already used")
            messages = build_messages(parsed.problem, instruction, cfg.system_prompt)
            prompt_ids = render_prompt(tokenizer, messages, cfg.chat_template)
            if len(prompt_ids) > cfg.max_prompt_tokens:
                limit = cfg.max_prompt_tokens
                raise RowError(
                    "too_long", f"{len(prompt_ids)} prompt tokens > data.max_prompt_tokens {limit}"
                )
        except RowError as error:
            skipped.add(index, error)
            continue
        seen_ids.add(task_id)
        tasks.append(
            Task(
                task_id=task_id,
                messages=messages,
                answer=parsed.answer,
                kind=task_type.name,
                prompt_ids=prompt_ids,
                meta=parsed.meta,
            )
        )
    skipped.check(len(rows), cfg.max_bad_fraction, source)
    return TaskSet(tasks, task_type.name, split, source, skipped.stats(len(rows)))
