"""Workflows turn tasks into groups of trajectories through a rollout engine.

A workflow is the only place that knows about turns, tools or guidance prefixes; the loop sees
trajectories with role-tagged spans. `single_turn` serves GRPO, PPO, RLOO and friends.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from llmrl.rollout.base import RolloutEngine, SamplingParams
from llmrl.types import Span, Task, Trajectory


class Workflow(Protocol):
    def __call__(
        self, tasks: list[Task], engine: RolloutEngine, sampling: SamplingParams, n: int, tokenizer: Any, first_group_id: int
    ) -> list[Trajectory]: ...


WORKFLOWS: dict[str, Workflow] = {}


def register_workflow(name: str) -> Callable[[Workflow], Workflow]:
    def register(fn: Workflow) -> Workflow:
        WORKFLOWS[name] = fn
        return fn

    return register


@register_workflow("single_turn")
def single_turn(
    tasks: list[Task], engine: RolloutEngine, sampling: SamplingParams, n: int, tokenizer: Any, first_group_id: int
) -> list[Trajectory]:
    """n samples of each task's prompt; every sampled token (the EOS included) is a policy token."""
    prompts = [task.prompt_ids for task in tasks for _ in range(n)]
    completions = engine.generate(prompts, sampling)
    trajectories = []
    for k, completion in enumerate(completions):
        task = tasks[k // n]
        p = len(task.prompt_ids)
        total = p + len(completion.token_ids)
        trajectories.append(
            Trajectory(
                task=task,
                token_ids=list(task.prompt_ids) + list(completion.token_ids),
                spans=[Span("prompt", 0, p), Span("policy", p, total)],
                rollout_logprobs=[0.0] * p + list(completion.logprobs),
                finish_reason=completion.finish_reason,
                group_id=first_group_id + k // n,
                completion_text=tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                turn_ends=[total - 1] if total > p else [],
            )
        )
    return trajectories
