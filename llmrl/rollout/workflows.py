"""Workflows turn tasks into scored groups of trajectories through a rollout engine.

A workflow is the only place that knows about turns, tools or guidance prefixes; the loop sees
groups of trajectories with role-tagged spans and reward entries. It is a registered class,
built once per run with its typed options (`rollout.workflow` in the recipe), and called each
step with a `WorkflowContext`. It may score its own samples (a probe of how hard a task is, or
turn rewards), and may leave a group out of what it returns.

Adding one: subclass `Workflow`, give it an `Options` section if it has knobs, and decorate it
with `@WORKFLOWS.register("name")` (WORKFLOWS lives in llmrl/rollout/base.py) (docs/architecture.md has a worked example).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from llmrl.config_base import Section
from llmrl.rollout.base import WORKFLOWS, RolloutEngine, SamplingParams, WorkflowConfig
from llmrl.types import Group, GroupIds, Span, Task, Trajectory


def _no_timer(name: str) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass
class WorkflowContext:
    """What a workflow may use in one step."""

    engine: RolloutEngine
    rewards: Any  # llmrl.reward.RewardComputer: `score(trajectories) -> list[RewardResult]`
    sampling: SamplingParams
    tokenizer: Any
    group_ids: GroupIds
    step: int
    n: int  # samples per task (rollout.n)
    timer: Callable[[str], AbstractContextManager[None]] = field(default=_no_timer)  # phases: generate, reward


class NoOptions(Section):
    """A workflow without options."""


class Workflow(ABC):
    """Base class: `run` returns the step's scored groups."""

    Options: type[Section] = NoOptions
    generates = True  # samples rollout.n completions per task (False: a step without rollouts, as SFT)

    def __init__(self, options: Section | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def run(self, tasks: list[Task], ctx: WorkflowContext) -> list[Group]:
        """Scored groups for `tasks` (one group per task, unless the workflow leaves some out)."""

    def start(self, tasks: list[Task], ctx: WorkflowContext) -> None:
        """Once before the first step (after a resume has restored the state), with every training
        task: a workflow may probe them (POPE finds its hard problems here). Nothing by default."""

    def metrics(self) -> dict[str, float]:
        """The last step's figures, logged with the step's metrics."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run continues exactly (POPE: hard problems, prefixes)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def score(self, groups: list[Group], ctx: WorkflowContext) -> None:
        """Write each trajectory's outcome reward (and its parts) with the run's reward functions."""
        trajectories = [t for g in groups for t in g.trajectories]
        with ctx.timer("reward"):
            for traj, result in zip(trajectories, ctx.rewards.score(trajectories)):
                traj.set_outcome(result.score, result.parts)


def build_workflow(cfg: WorkflowConfig) -> Workflow:
    if cfg.name is None:
        raise ValueError("rollout.workflow.name is unresolved; resolve the recipe first (llmrl.resolve.resolve_recipe)")
    cls = WORKFLOWS[cfg.name]
    return cls(cls.Options.model_validate(cfg.options()))


@WORKFLOWS.register("single_turn")
class SingleTurn(Workflow):
    """n samples of each task's prompt; every sampled token (the EOS included) is a policy token."""

    def run(self, tasks: list[Task], ctx: WorkflowContext) -> list[Group]:
        groups = self.sample(tasks, ctx)
        self.score(groups, ctx)
        return groups

    def sample(self, tasks: list[Task], ctx: WorkflowContext) -> list[Group]:
        """The groups, not yet scored (the evaluation harness grades them itself)."""
        with ctx.timer("generate"):
            prompts = [task.prompt_ids for task in tasks for _ in range(ctx.n)]
            completions = ctx.engine.generate(prompts, ctx.sampling)
            groups = []
            for i, task in enumerate(tasks):
                group_id = ctx.group_ids.take()
                mine = completions[i * ctx.n : (i + 1) * ctx.n]
                groups.append(Group(group_id, task, [self._trajectory(task, c, group_id, ctx.tokenizer) for c in mine]))
        return groups

    @staticmethod
    def _trajectory(task: Task, completion: Any, group_id: int, tokenizer: Any) -> Trajectory:
        p = len(task.prompt_ids)
        total = p + len(completion.token_ids)
        return Trajectory(
            task=task,
            token_ids=list(task.prompt_ids) + list(completion.token_ids),
            spans=[Span("prompt", 0, p), Span("policy", p, total)],
            rollout_logprobs=[0.0] * p + list(completion.logprobs),
            finish_reason=completion.finish_reason,
            group_id=group_id,
            completion_text=tokenizer.decode(completion.token_ids, skip_special_tokens=True),
            turn_ends=[total - 1] if total > p else [],
        )


@WORKFLOWS.register("none")
class NoRollout(Workflow):
    """No generation at all: the step trains on what stages add (the `sft` preset's expert rows)."""

    generates = False

    def run(self, tasks: list[Task], ctx: WorkflowContext) -> list[Group]:
        return []
