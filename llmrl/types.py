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
    # Loss weight of the span's tokens. Only policy spans are ever trained: prompt, observation
    # and guidance (POPE's oracle prefix) tokens get no loss whatever their weight.
    weight: float = 1.0

    def __len__(self) -> int:
        return self.end - self.start


OUTCOME = "outcome"  # the reward channel of a trajectory's final score


@dataclass
class RewardEntry:
    """One reward on one token: IGPO's turn rewards are entries at each turn's last token in their
    own channel; the outcome score is one entry in channel `outcome` at the last policy token."""

    position: int  # token index
    channel: str
    value: float


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
    rewards: list[RewardEntry] = field(default_factory=list)  # (position, channel, value) entries
    reward_parts: dict[str, float] = field(default_factory=dict)  # the outcome's named parts, logged
    turn_ends: list[int] = field(default_factory=list)  # token index of each turn's last token
    # A row of expert data (CHORD): its policy tokens feed the SFT part, not the policy-gradient
    # parts, and it stays out of group and batch statistics.
    expert: bool = False
    guided: bool = False  # a POPE guided copy: its guidance span holds an oracle-solution prefix
    guidance_text: str = ""  # that prefix as text, for rollout logs
    advantage: float | None = None  # filled after advantages, for rollout logs

    @property
    def reward(self) -> float:
        """The outcome score (channel `outcome`), as logged and as DAPO's filter reads it."""
        return sum(e.value for e in self.rewards if e.channel == OUTCOME)

    @reward.setter
    def reward(self, score: float) -> None:
        self.set_outcome(score)

    def set_outcome(self, score: float, parts: dict[str, float] | None = None) -> None:
        """Replace the outcome reward: one entry at the last policy token (the last token when
        the response is empty, so row-sum estimators still see it while its loss mask is 0)."""
        self.rewards = [e for e in self.rewards if e.channel != OUTCOME]
        self.rewards.append(RewardEntry(self.last_policy_position, OUTCOME, score))
        if parts is not None:
            self.reward_parts = parts

    @property
    def last_policy_position(self) -> int:
        ends = [s.end - 1 for s in self.spans if s.role == "policy" and len(s)]
        return max(ends) if ends else len(self.token_ids) - 1

    @property
    def policy_mask(self) -> list[float]:
        """Per token: the loss weight of policy tokens, 0 for every other role."""
        mask = [0.0] * len(self.token_ids)
        for span in self.spans:
            if span.role == "policy":
                mask[span.start : span.end] = [span.weight] * len(span)
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


@dataclass
class Group:
    """The samples of one task that are compared with each other (a GRPO group). A workflow
    returns scored groups; every trajectory in it carries `group_id`."""

    group_id: int
    task: Task
    trajectories: list[Trajectory]


class GroupIds:
    """Hands out group ids unique across generation rounds and steps; saved with the loop state
    so a resumed run keeps counting."""

    def __init__(self, start: int = 0) -> None:
        self.next_id = start

    def take(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def state_dict(self) -> dict[str, int]:
        return {"next_id": self.next_id}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_id = int(state["next_id"])
