"""DAPO's batch-level options, as the loop applies them to any algorithm (docs/formulas.md, DAPO).

Yu et al. 2025, arXiv 2503.14476:
- dynamic sampling: groups whose samples all scored the same carry no learning signal, so they
  are dropped and more prompts are sampled until the step has `prompts_per_step` groups;
- overlong shaping: a length penalty added to the reward (the `overlong` reward function);
- overlong filtering: truncated responses get no loss (`mask_truncated`, in advantages.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmrl.algorithms.advantages import dynamic_sampling_keep
from llmrl.reward import RewardConfig, RewardFunctionSpec, default_reward_for_kind
from llmrl.types import Group


def overlong_buffer_len(algo: Any, max_new_tokens: int) -> int:
    """The overlong penalty's buffer: `algo.overlong_buffer_len`, by default a fifth of L_max
    (DAPO used 4096 of 20480). `llmrl validate` asks this too, so a buffer longer than L_max is
    refused before the run starts."""
    buffer_len = algo.overlong_buffer_len or max(1, max_new_tokens // 5)
    if buffer_len > max_new_tokens:
        raise ValueError(
            f"algorithm.overlong_buffer_len ({buffer_len}) must not exceed rollout.max_new_tokens ({max_new_tokens})"
        )
    return buffer_len


def reward_config_with_overlong(reward: RewardConfig, algo: Any, max_new_tokens: int, data_kind: str | None) -> RewardConfig:
    """The recipe's rewards, plus the `overlong` penalty when `algo.overlong_shaping` is on.

    The penalty's L_max is the rollout's max_new_tokens; its buffer defaults to a fifth of it
    (DAPO used 4096 of 20480).
    """
    if not algo.overlong_shaping:
        return reward
    functions = list(reward.functions)
    if not functions and data_kind is not None:
        functions = [default_reward_for_kind(data_kind)]  # keep the task reward the empty list implied
    buffer_len = overlong_buffer_len(algo, max_new_tokens)
    functions.append(
        RewardFunctionSpec(
            fn="overlong",
            kwargs={"max_len": max_new_tokens, "buffer_len": buffer_len, "penalty_factor": algo.overlong_penalty_factor},
        )
    )
    return reward.model_copy(update={"functions": functions})


@dataclass
class GroupFilter:
    """Accumulates the groups dynamic sampling keeps over one step's generation rounds.

    Every generated group ends in exactly one of three counts, so that
    groups_generated = groups_trained + groups_dropped + groups_surplus:
      trained  its metric varies (or it has one member) and it is in the step's batch;
      dropped  its metric is the same for every member: no learning signal;
      surplus  it varies, but came in the round that filled the step, past prompts_per_step,
               and is discarded (verl trims the surplus the same way).
    """

    wanted_groups: int
    metric: str
    kept: list[Group] = field(default_factory=list)
    last_round: list[Group] = field(default_factory=list)
    rounds: int = 0
    generated_groups: int = 0
    dropped_groups: int = 0
    surplus_groups: int = 0

    @property
    def kept_groups(self) -> int:
        return len(self.kept)

    @property
    def full(self) -> bool:
        return self.kept_groups >= self.wanted_groups

    def add(self, groups: list[Group]) -> None:
        """Keep the groups of one round whose metric varies (or that have a single sample)."""
        self.rounds += 1
        self.last_round = groups
        trajectories = [t for g in groups for t in g.trajectories]
        group_ids = torch.tensor([t.group_id for t in trajectories])
        values = torch.tensor([float(t.reward_parts.get(self.metric, t.reward)) for t in trajectories])
        keep = dynamic_sampling_keep(group_ids, values).tolist()
        kept_now = {t.group_id for t, k in zip(trajectories, keep) if k}
        self.generated_groups += len(groups)
        self.dropped_groups += len(groups) - len(kept_now)
        room = self.wanted_groups - self.kept_groups
        accepted = set(sorted(kept_now)[: max(room, 0)])  # verl also trims the surplus of the last round
        self.surplus_groups += len(kept_now) - len(accepted)
        self.kept.extend(g for g in groups if g.group_id in accepted)

    def result(self) -> tuple[list[Group], dict[str, float]]:
        """The step's groups and the sampling metrics (meanings in the class docstring).

        If the round cap came first with no group kept, the last round is trained as it is: its
        advantages are all zero, so the step changes nothing but stays a normal step. Its groups
        stay counted as dropped (they carry no signal), and `sampling/groups_fallback` says how
        many of them the batch holds (0 on every other step).
        """
        fallback = [] if self.kept else self.last_round
        metrics = {
            "sampling/rounds": float(self.rounds),
            "sampling/groups_generated": float(self.generated_groups),
            "sampling/groups_trained": float(self.kept_groups),
            "sampling/groups_dropped": float(self.dropped_groups),
            "sampling/groups_surplus": float(self.surplus_groups),
            "sampling/groups_fallback": float(len(fallback)),
        }
        return self.kept or fallback, metrics
