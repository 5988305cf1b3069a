"""Core data types shared by every stage of the loop.

A `Task` is what the data layer produces; a `Trajectory` is what a workflow produces from a
task through a rollout engine. Trajectories carry their tokens split into role-tagged spans so
that loss masks come from roles, never from pad ids (SmolLM2 pads with its EOS token, and the
sampled EOS is a policy token that belongs in the loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SpanRole = Literal["prompt", "policy", "observation", "guidance"]
FinishReason = Literal["stop", "length"]


@dataclass
class Task:
    """One problem. `messages` is the chat prompt; `answer` the gold answer (or None).

    `meta` holds privileged or extra fields: `oracle_solution` (POPE), `expert_response`
    (CHORD), `tools` (agents), `subject`/`level` (MATH) and anything a reward may want.
    """

    task_id: str
    messages: list[dict[str, str]]
    answer: str | None = None
    kind: str = "generic"
    prompt_ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Span:
    role: SpanRole
    start: int  # token index, inclusive
    end: int  # token index, exclusive

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Completion:
    """What a RolloutEngine returns for one sample."""

    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under logits / temperature
    finish_reason: FinishReason


@dataclass
class Trajectory:
    """A full token sequence for one sample plus everything the update needs."""

    task: Task
    token_ids: list[int]
    spans: list[Span]
    rollout_logprobs: list[float]  # aligned with token_ids; 0.0 outside policy spans
    finish_reason: FinishReason
    group_id: int
    completion_text: str = ""
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    turn_ends: list[int] = field(default_factory=list)  # token index of each turn's last token
    expert: bool = False
    guided: bool = False
    advantage: float | None = None  # filled after advantages, for rollout logs

    @property
    def policy_mask(self) -> list[int]:
        mask = [0] * len(self.token_ids)
        for span in self.spans:
            if span.role == "policy":
                mask[span.start : span.end] = [1] * len(span)
        return mask

    @property
    def prompt_len(self) -> int:
        first = self.spans[0]
        return first.end if first.role == "prompt" else 0

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_policy_tokens(self) -> int:
        return sum(len(s) for s in self.spans if s.role == "policy")
