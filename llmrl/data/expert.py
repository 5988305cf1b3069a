"""Expert data for CHORD and SFT: (prompt, response) pairs whose response tokens are trained on.

The `expert` recipe section names where they come from:
  - nothing (`path` unset): the training task type's own worked solutions (`expert_response` in
    each task's meta: GSM8K's solution with its calculator notes removed, MATH's `solution`, the
    arithmetic generator's step-by-step solution);
  - a .jsonl/.json/.parquet file, a directory or a hub id, read through `datasets`, with either a
    `messages` column (a chat ending in the assistant's reply) or `prompt` and `response` columns.
Expert prompts get the same instruction, system prompt and chat template as the RL prompts.
Malformed rows are skipped and counted like RL rows, and loading fails, naming the first bad
row, when more than `max_bad_fraction` of them are.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from llmrl.config_base import Section
from llmrl.data.builtin import RowError, SkippedRows, check_problem, get_task_type
from llmrl.data.config import DataConfig, DataConfigError
from llmrl.data.prompts import build_messages, render_prompt
from llmrl.data.sources import load_rows
from llmrl.types import Task

DEFAULT_FIELDS = {"messages": "messages", "prompt": "prompt", "response": "response", "id": "id"}


class ExpertConfig(Section):
    path: str | None = Field(
        None,
        description="Where expert rows come from: a .jsonl/.json/.parquet file, a directory or a hub id. Unset: the "
        "training tasks' own worked solutions (gsm8k, math and arithmetic have them).",
    )
    split: str = Field("train", description="Split read from `path`.")
    subset: str | None = Field(None, description="Hub dataset configuration name, for hub ids.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Maps `messages`, `prompt`, `response` and `id` to the file's columns (defaults: the same names). "
        "A row with a messages column is a chat whose last message is the assistant's reply to train on.",
    )
    expert_data_ratio: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of each step's (and each mini-batch's) training ROWS that are expert rows, the rest being "
        "on-policy samples: E = ceil(ratio / (1 - ratio) x on-policy rows per step). 0.2 as the authors' example "
        "(64 expert + 256 on-policy). train.mini_batch_size counts the on-policy rows; the expert rows are dealt to the "
        "mini-batches in proportion. A step without rollouts (the sft preset) trains on prompts_per_step x rollout.n expert rows.",
    )
    max_tokens: int = Field(1024, ge=2, description="Expert rows longer than this many tokens (prompt + response) are skipped.")
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Largest share of malformed expert rows skipped quietly; above it loading fails."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N expert rows.")


@dataclass
class ExpertExample:
    task: Task  # the prompt (messages, templated ids), as for an RL task
    response: str
    response_ids: list[int]  # the response's tokens and the EOS that ends the reply
    # A multi-turn demonstration: (role, token count) of each consecutive piece of response_ids,
    # `policy` (trained on) or `observation` (a tool result: context only). None: all policy.
    segments: list[tuple[str, int]] | None = None


@dataclass
class ExpertSet:
    examples: list[ExpertExample]
    source: str
    stats: dict[str, int]


def build_expert_set(cfg: ExpertConfig, data: DataConfig, tokenizer: Any, train_tasks: list[Task] | None = None) -> ExpertSet:
    """The expert examples of `cfg`, from its path or from `train_tasks`' worked solutions."""
    task_type = get_task_type(data.type)
    instruction = task_type.instruction if data.instruction is None else data.instruction
    skipped = SkippedRows()
    examples: list[ExpertExample] = []
    if cfg.path is None:
        rows: list[Any] = list(train_tasks or [])[: cfg.limit]
        source = f"worked solutions of the {data.type} training tasks"
    else:
        rows, source = load_rows(cfg.path, cfg.split, subset=cfg.subset, key="expert.path", limit=cfg.limit)
    fields = {**DEFAULT_FIELDS, **cfg.fields}
    for index, row in enumerate(rows):
        try:
            segments = None
            if isinstance(row, Task) and row.meta.get("expert_turns"):
                task = row
                response, response_ids, segments = _demonstration(row.meta["expert_turns"], tokenizer)
            else:
                if isinstance(row, Task):
                    task, response = row, _task_solution(row)
                else:
                    task, response = _parse_row(row, index, fields, instruction, data, tokenizer)
                response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
            if len(task.prompt_ids) + len(response_ids) > cfg.max_tokens:
                raise RowError("too_long", f"{len(task.prompt_ids) + len(response_ids)} tokens > expert.max_tokens {cfg.max_tokens}")
        except RowError as error:
            skipped.add(index, error)
            continue
        examples.append(ExpertExample(task, response, response_ids, segments))
    if not rows:
        raise DataConfigError(f"expert.path: {source} has no rows")
    try:
        skipped.check(len(rows), cfg.max_bad_fraction, source)
    except DataConfigError as err:
        raise DataConfigError(str(err).replace("data.max_bad_fraction", "expert.max_bad_fraction", 1)) from None
    return ExpertSet(examples, source, skipped.stats(len(rows)))


def _demonstration(turns: Any, tokenizer: Any) -> tuple[str, list[int], list[tuple[str, int]]]:
    """A multi-turn demonstration (meta `expert_turns`: [{"role": "policy" | "observation", "text"}]),
    tokenised piece by piece as the multi_turn workflow extends its sequences. It ends with its
    last policy piece: an agent episode stops at its closing tag, not at EOS."""
    if not isinstance(turns, list) or not turns:
        raise RowError("bad_expert_turns", "expert_turns must be a non-empty list of {role, text}")
    ids: list[int] = []
    segments: list[tuple[str, int]] = []
    for turn in turns:
        role, text = (turn.get("role"), turn.get("text")) if isinstance(turn, Mapping) else (None, None)
        if role not in ("policy", "observation") or not isinstance(text, str):
            raise RowError("bad_expert_turns", f"expert_turns entry {turn!r} needs role policy|observation and a text")
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        segments.append((role, len(piece)))
    return "".join(t["text"] for t in turns), ids, segments


def _task_solution(task: Task) -> str:
    response = str(task.meta.get("expert_response") or "").strip()
    if not response:
        raise RowError("no_expert_response", f"task {task.task_id} has no worked solution (expert_response)")
    return response


def _parse_row(
    row: Mapping[str, Any], index: int, fields: Mapping[str, str], instruction: str | None, data: DataConfig, tokenizer: Any
) -> tuple[Task, str]:
    chat = row.get(fields["messages"])
    if chat is not None:
        if not isinstance(chat, list) or not chat or not isinstance(chat[-1], Mapping) or chat[-1].get("role") != "assistant":
            raise RowError("bad_chat", f"column {fields['messages']!r} must be a chat ending in an assistant message")
        problem: Any = check_problem(chat[:-1])
        response = chat[-1].get("content")
    else:
        for key in ("prompt", "response"):
            if row.get(fields[key]) is None:
                raise RowError("missing_field", f"column {fields[key]!r} (expert.fields.{key}) is missing")
        problem, response = check_problem(row[fields["prompt"]]), row[fields["response"]]
    if not isinstance(response, str) or not response.strip():
        raise RowError("empty_response", "the expert response is empty")
    messages = build_messages(problem, instruction, data.system_prompt)
    row_id = row.get(fields["id"])
    task_id = f"expert-{index:06d}" if row_id is None else f"expert-{row_id}"
    return Task(task_id=task_id, messages=messages, kind="expert", prompt_ids=render_prompt(tokenizer, messages, data.chat_template)), response.strip()
