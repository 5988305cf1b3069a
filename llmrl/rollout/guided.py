"""POPE's `guided` workflow: privileged on-policy exploration of hard problems (Qu, Setlur, Smith,
Salakhutdinov, Kumar 2026, arXiv 2601.18779; docs/algorithms.md, "POPE").

On a problem the policy never solves, every sample of its GRPO group scores the same, so the
group teaches nothing. For such a hard problem this workflow also samples guided copies: the
problem with an instruction to continue a partial solution, and the assistant's reply already
begun with a prefix of an oracle solution. The policy writes only the continuation. The prefix
is a `guidance` span: context, never a training target (loss weight 0). Guided and unguided
copies are separate groups with separate baselines.

A problem is hard when no sample of it was correct (outcome reward >= `correct_reward`), found
one of three ways (`hard_from`): online (its unguided group on its last visit), a probe of
`probe_samples` samples per problem at the start of the run, or offline from an `llmrl eval
--n K` per_item.jsonl (0 correct of K). Its prefix is the shortest fraction of the oracle in
`prefix_grid` under which a probe of `probe_samples` samples finds a correct answer; if none
does, the longest. Hard problems, their prefixes and the known-easy ones are part of the loop's
checkpoint, so a resumed run guides with the same prefixes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmrl.config_base import Section
from llmrl.data.prompts import tokenize_prompt
from llmrl.rollout.base import WORKFLOWS
from llmrl.rollout.workflows import SingleTurn, WorkflowContext
from llmrl.types import Group, Span, Task, Trajectory

DEFAULT_GUIDE = (
    "Your reply below starts with the beginning of a worked solution. Read it, check it, and "
    "continue it to the final answer. You may restate or redo its steps."
)


class GuidedOptions(Section):
    hard_from: Literal["online", "probe", "offline"] = Field(
        "online",
        description="How hard problems are found: online (a problem whose unguided group had no correct sample on its "
        "last visit), probe (probe_samples samples of every training problem before step 1), or offline "
        "(hard_file: an `llmrl eval --n K` per_item.jsonl of the training split; 0 correct of K is hard).",
    )
    hard_file: str | None = Field(None, description="offline: the per_item.jsonl that lists each task_id's num_correct.")
    probe_samples: int = Field(8, ge=1, description="Samples per problem in the start-of-run probe and per prefix tried in the prefix search.")
    prefix_grid: list[float] = Field(
        [0.0625, 0.125, 0.1875, 0.25],
        description="Oracle-solution fractions tried as prefixes, shortest first; the paper searches up to about a quarter.",
    )
    guide_instruction: str = Field(
        DEFAULT_GUIDE,
        description="Appended to a guided copy's problem. The paper found that forbidding the model to restate or "
        "recompute the guidance raised guided accuracy but lowered transfer, so the default allows it.",
    )
    guided_copies: int = Field(
        1, ge=0,
        description="Guided groups per unguided group of each hard problem (1: the paper's 1:1 mixture; 0: plain GRPO on "
        "the same problems, for comparisons).",
    )
    include_easy: bool = Field(
        True,
        description="Keep training on problems known to be solvable (the paper's best run mixed easy problems in); "
        "false drops them, so the step trains on hard and not-yet-seen problems only.",
    )
    grade_with_prefix: bool = Field(
        False,
        description="Grade the prefix plus the continuation instead of the continuation alone. Off: the reward is for "
        "what the policy wrote, so a prefix that holds the answer (a long grid entry) cannot be cashed in by stopping.",
    )
    correct_reward: float = Field(1.0, description="A sample counts as correct (not hard, solved) when its outcome reward is at least this.")

    @field_validator("prefix_grid")
    @classmethod
    def _grid(cls, grid: list[float]) -> list[float]:
        if not grid or any(not 0 < f <= 1 for f in grid):
            raise ValueError(f"every prefix_grid fraction must be in (0, 1], got {grid}")
        return sorted(set(grid))

    @model_validator(mode="after")
    def _file_for_offline(self) -> "GuidedOptions":
        if (self.hard_from == "offline") != (self.hard_file is not None):
            raise ValueError("hard_file is required with hard_from: offline, and only then")
        return self


@dataclasses.dataclass
class StepCounts:
    tasks: int = 0
    hard: int = 0
    no_oracle: int = 0
    guided_samples: int = 0
    guided_correct: int = 0
    hard_samples: int = 0
    hard_correct: int = 0
    prefix_fracs: list[float] = dataclasses.field(default_factory=list)
    groups: dict[bool, list[int]] = dataclasses.field(default_factory=lambda: {True: [0, 0], False: [0, 0]})  # guided -> [learning, all]
    probe_samples: int = 0


@WORKFLOWS.register("guided")
class Guided(SingleTurn):
    Options = GuidedOptions

    def __init__(self, options: Section | None = None) -> None:
        super().__init__(options)
        self.hard: dict[str, float | None] = {}  # task_id -> prefix fraction (None: not searched yet or no oracle)
        self.easy: set[str] = set()
        self.started = False
        self.counts = StepCounts()

    # ------------------------------------------------------------------ run
    def start(self, tasks: list[Task], ctx: WorkflowContext) -> None:
        """Before step 1: find hard problems (probe or offline) and their prefixes. Nothing to do
        online, or when a resumed run restored them."""
        if self.started:
            return
        self.started = True
        opts = self.options
        if opts.hard_from == "offline":
            self._read_hard_file(tasks, Path(opts.hard_file))
        elif opts.hard_from == "probe":
            self._probe(tasks, ctx)
        if opts.guided_copies:
            self._search_prefixes([t for t in tasks if t.task_id in self.hard], ctx)

    def run(self, tasks: list[Task], ctx: WorkflowContext) -> list[Group]:
        self.counts = StepCounts(tasks=len(tasks))
        kept = [t for t in tasks if self.options.include_easy or t.task_id not in self.easy]
        groups = self.sample(kept, ctx)
        hard = [t for t in kept if t.task_id in self.hard]
        with_oracle = [t for t in hard if self._oracle_ids(t, ctx) is not None]
        self.counts.hard, self.counts.no_oracle = len(hard), len(hard) - len(with_oracle)
        if self.options.guided_copies:  # 0: GRPO on the same pool, no prefix to search
            self._search_prefixes(with_oracle, ctx)
            self.counts.prefix_fracs = [self.hard[t.task_id] for t in with_oracle]
            copies = [(t, self.hard[t.task_id]) for t in with_oracle for _ in range(self.options.guided_copies)]
            # a seed apart from the unguided call's, so guided and unguided samples draw different streams
            groups += self._guided_groups(copies, ctx, ctx.n, _offset(ctx.sampling, "guided"))
        self.score(groups, ctx)
        self._learn_from(groups)
        return groups

    def _guided_groups(self, items: list[tuple[Task, float]], ctx: WorkflowContext, n: int, sampling: Any) -> list[Group]:
        """n samples of each (task, prefix fraction)'s guided prompt, in one engine call."""
        if not items:
            return []
        prompts = [self._guided_prompt(task, fraction, ctx) for task, fraction in items]
        with ctx.timer("generate"):
            completions = ctx.engine.generate([p + g for p, g in prompts for _ in range(n)], sampling)
        groups = []
        for index, ((task, _), (prompt_ids, prefix_ids)) in enumerate(zip(items, prompts)):
            group_id = ctx.group_ids.take()
            prefix_text = ctx.tokenizer.decode(prefix_ids, skip_special_tokens=True)
            p, g = len(prompt_ids), len(prefix_ids)
            trajectories = []
            for completion in completions[index * n : (index + 1) * n]:
                total = p + g + len(completion.token_ids)
                text = ctx.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                trajectories.append(Trajectory(
                    task=task,
                    token_ids=prompt_ids + prefix_ids + list(completion.token_ids),
                    spans=[Span("prompt", 0, p), Span("guidance", p, p + g, weight=0.0), Span("policy", p + g, total)],
                    rollout_logprobs=[0.0] * (p + g) + list(completion.logprobs),
                    finish_reason=completion.finish_reason,
                    group_id=group_id,
                    completion_text=prefix_text + text if self.options.grade_with_prefix else text,
                    turn_ends=[total - 1] if total > p + g else [],
                    guided=True,
                    guidance_text=prefix_text,
                ))
            groups.append(Group(group_id, task, trajectories))
        return groups

    def _guided_prompt(self, task: Task, fraction: float, ctx: WorkflowContext) -> tuple[list[int], list[int]]:
        """The problem with the guide instruction (chat-templated up to the assistant's turn), and
        the first ceil(fraction x length) tokens of the oracle solution that begin the reply."""
        messages = [dict(m) for m in task.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = f"{messages[last_user]['content']}\n\n{self.options.guide_instruction}"
        oracle = self._oracle_ids(task, ctx)
        return tokenize_prompt(ctx.tokenizer, messages), oracle[: max(1, math.ceil(fraction * len(oracle)))]

    @staticmethod
    def _oracle_ids(task: Task, ctx: WorkflowContext) -> list[int] | None:
        oracle = str(task.meta.get("oracle_solution") or "").strip()
        return ctx.tokenizer.encode(oracle, add_special_tokens=False) if oracle else None

    # ------------------------------------------------------------------ hard problems and prefixes
    def _correct(self, trajectory: Trajectory) -> bool:
        return trajectory.reward >= self.options.correct_reward

    def _learn_from(self, groups: list[Group]) -> None:
        """Step metrics; online, an unguided group with no correct sample makes its problem hard,
        and one with a correct sample makes it easy."""
        for group in groups:
            guided = group.trajectories[0].guided if group.trajectories else False
            correct = [self._correct(t) for t in group.trajectories]
            learning = len({t.reward for t in group.trajectories}) > 1  # GRPO: equal rewards, zero advantage
            self.counts.groups[guided][0] += learning
            self.counts.groups[guided][1] += 1
            task_id = group.task.task_id
            if guided:
                self.counts.guided_samples += len(correct)
                self.counts.guided_correct += sum(correct)
                continue
            if task_id in self.hard:
                self.counts.hard_samples += len(correct)
                self.counts.hard_correct += sum(correct)
            if self.options.hard_from != "online":
                continue
            if any(correct):
                self.hard.pop(task_id, None)
                self.easy.add(task_id)
            elif task_id not in self.hard:
                self.hard[task_id] = None
                self.easy.discard(task_id)

    def _search_prefixes(self, tasks: list[Task], ctx: WorkflowContext, chunk: int = 32) -> None:
        """For each task without a prefix yet: the shortest grid fraction under which one of
        probe_samples guided samples is correct, else the longest. One engine call per fraction
        for all the tasks still searching."""
        pending = [t for t in tasks if self.hard.get(t.task_id) is None and self._oracle_ids(t, ctx) is not None]
        grid, n = self.options.prefix_grid, self.options.probe_samples
        for fraction in grid:
            if not pending:
                return
            for start in range(0, len(pending), chunk):
                sampling = _offset(ctx.sampling, f"prefix {fraction} {start}")
                groups = self._guided_groups([(t, fraction) for t in pending[start : start + chunk]], ctx, n, sampling)
                self.score(groups, ctx)
                self.counts.probe_samples += n * len(groups)
                for group in groups:
                    if any(self._correct(t) for t in group.trajectories):
                        self.hard[group.task.task_id] = fraction
                if len(tasks) > chunk:  # a start-of-run search is long enough to want progress; a step's is not
                    solved = sum(self.hard[t.task_id] == fraction for t in pending[: start + chunk])
                    print(f"pope prefix search at {fraction:g}: {min(start + chunk, len(pending))}/{len(pending)} problems, "
                          f"{solved} solved", file=sys.stderr)
            pending = [t for t in pending if self.hard[t.task_id] is None]
        for task in pending:
            self.hard[task.task_id] = grid[-1]

    def _probe(self, tasks: list[Task], ctx: WorkflowContext, chunk: int = 32) -> None:
        """probe_samples unguided samples of every task: none correct makes it hard."""
        n = self.options.probe_samples
        for start in range(0, len(tasks), chunk):
            probe = dataclasses.replace(ctx, n=n, sampling=_offset(ctx.sampling, f"probe {start}"))
            groups = self.sample(tasks[start : start + chunk], probe)
            self.score(groups, ctx)
            for group in groups:
                solved = any(self._correct(t) for t in group.trajectories)
                (self.easy.add(group.task.task_id) if solved else self.hard.__setitem__(group.task.task_id, None))
            done = min(start + chunk, len(tasks))
            print(f"pope probe: {done}/{len(tasks)} problems, {len(self.hard)} hard so far", file=sys.stderr)

    def _read_hard_file(self, tasks: list[Task], path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"rollout.workflow.hard_file: {path} does not exist (write it with `llmrl eval ... --n K`)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        known = {t.task_id for t in tasks}
        matched = [r for r in rows if r.get("task_id") in known]
        if not matched:
            raise ValueError(f"rollout.workflow.hard_file: none of {path}'s {len(rows)} task ids is a training task; evaluate the training split")
        for row in matched:
            (self.hard.__setitem__(row["task_id"], None) if row["num_correct"] == 0 else self.easy.add(row["task_id"]))

    # ------------------------------------------------------------------ loop hooks
    def metrics(self) -> dict[str, float]:
        c = self.counts
        out = {
            "pope/hard_frac": c.hard / max(c.tasks, 1),
            "pope/no_oracle": float(c.no_oracle),
            "pope/guided_solve_rate": c.guided_correct / max(c.guided_samples, 1),
            "pope/unguided_hard_solve_rate": c.hard_correct / max(c.hard_samples, 1),
            "pope/prefix_frac_mean": sum(c.prefix_fracs) / max(len(c.prefix_fracs), 1),
            "pope/probe_samples": float(c.probe_samples),
            "pope/hard_known": float(len(self.hard)),
        }
        for guided, name in ((True, "guided"), (False, "unguided")):
            learning, total = c.groups[guided]
            out[f"pope/nonzero_adv_frac_{name}"] = learning / max(total, 1)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"hard": dict(self.hard), "easy": sorted(self.easy), "started": self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return  # a checkpoint from a run without this workflow: start afresh
        self.hard = dict(state["hard"])
        self.easy = set(state["easy"])
        self.started = bool(state["started"])


def _offset(sampling: Any, purpose: str) -> Any:
    """`sampling` with a seed of its own for `purpose` (stable across processes, unlike hash())."""
    import zlib

    if sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + 1 + zlib.crc32(purpose.encode()) % 1_000_003)
