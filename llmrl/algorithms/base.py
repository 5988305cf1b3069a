"""The contracts between the loop, the train engine and the algorithm registries.

Tensors are token-aligned: for a padded batch of shape [B, T], position t of every per-token
tensor describes token t of `input_ids` (its logprob is log p(x_t | x_<t)); position 0 is never
a target and is always masked out.

Micro-batch keys (all torch tensors):
  input_ids [B,T] long, attention_mask [B,T] long, position_ids [B,T] long,
  loss_mask [B,T] float (1 on policy tokens only), old_logprobs [B,T], rollout_logprobs [B,T],
  ref_logprobs [B,T] (only when a reference is loaded), advantages [B,T], rewards/<channel> [B,T]
  (one per reward channel: outcome, kl, ...), returns [B,T] and old_values [B,T] (critic stage only),
  group_ids [B] long, turn_ids [B,T] long, expert_mask [B] bool, truncated [B] bool.
Model outputs given to a loss: logprobs [B,T] (differentiable), entropy [B,T] (when asked for),
values [B,T] (critic).

Normalisation: a loss returns, per named part, a differentiable *sum* and declares, from masks
alone, the part's *denominator contribution* of that micro-batch. The train engine adds the
denominators over every micro-batch of the mini-batch (and over data-parallel ranks) before
the first backward, then minimises  sum_p weight_p * sum_p / D_p.  That is the single place
where gradient accumulation, rank count and per-part weighting (CHORD) are made right.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]


@dataclass
class LossContext:
    step: int  # RL step, 0-based (CHORD's mu schedule reads it)
    cfg: Any  # the recipe's `algorithm` section
    generator: torch.Generator | None = None  # for random token selection (Clip-Cov)
    measure_rollout_gap: bool = False  # the engine logs rollout/logprob_diff over the rows it trains (the step's one on-policy update)


@dataclass
class LossOutput:
    sums: dict[str, torch.Tensor]  # part -> differentiable scalar numerator
    weights: dict[str, float] = field(default_factory=dict)  # part -> weight, default 1.0
    # metric -> (sum, count); the engine reports sum(sums)/sum(counts) over the mini-batch
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


class LossFn(Protocol):
    def denominators(self, mb: Batch, ctx: LossContext) -> dict[str, float]:
        """Per part, this micro-batch's share of the normaliser; masks only, no model output."""

    def __call__(self, mb: Batch, out: Batch, ctx: LossContext) -> LossOutput:
        ...


# Optional attributes of a loss, read by the train engine:
#   outputs: tuple[str, ...]  the model outputs it reads; default ("logprobs", "entropy").
#   gradient_outputs(cfg) -> set[str]  those it differentiates; default all of `outputs`. The
#       engine hands the others over detached, which spares backward their recomputation (a
#       full-vocabulary softmax per token for an entropy that is only logged).


REWARD_PREFIX = "rewards/"  # batch key of a reward channel: rewards/<channel> [B,T]


def reward_channels(batch: Batch) -> dict[str, torch.Tensor]:
    """The batch's reward channels by name (outcome, kl, per-turn channels...)."""
    return {k[len(REWARD_PREFIX):]: v for k, v in batch.items() if k.startswith(REWARD_PREFIX)}


def total_token_rewards(channels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-token reward every channel adds up to, in name order (so the sum is reproducible)."""
    names = sorted(channels)
    total = channels[names[0]]
    for name in names[1:]:
        total = total + channels[name]
    return total


@dataclass
class AdvantageInputs:
    """Everything an advantage estimator may read, for one batch of rows."""

    rewards: dict[str, torch.Tensor]  # channel -> [B,T] token rewards
    loss_mask: torch.Tensor  # [B,T] float, policy tokens
    group_ids: torch.Tensor  # [B] long
    cfg: Any  # the resolved `algorithm` section
    turn_ids: torch.Tensor | None = None  # [B,T] long, for turn-level estimators (IGPO)
    values: torch.Tensor | None = None  # [B,T] critic values (GAE)
    expert_mask: torch.Tensor | None = None  # [B] bool, rows from expert data (CHORD)

    @property
    def token_rewards(self) -> torch.Tensor:
        return total_token_rewards(self.rewards)

    @classmethod
    def from_batch(cls, batch: Batch, cfg: Any) -> "AdvantageInputs":
        return cls(
            rewards=reward_channels(batch), loss_mask=batch["loss_mask"], group_ids=batch["group_ids"], cfg=cfg,
            turn_ids=batch.get("turn_ids"), values=batch.get("old_values"), expert_mask=batch.get("expert_mask"),
        )

    @classmethod
    def outcome(cls, token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, cfg: Any, **rest: Any) -> "AdvantageInputs":
        """Inputs with one reward channel, `outcome`: the common case, and the tests' shorthand."""
        return cls(rewards={"outcome": token_rewards}, loss_mask=loss_mask, group_ids=group_ids, cfg=cfg, **rest)

    def select(self, rows: torch.Tensor) -> "AdvantageInputs":
        """The same inputs restricted to `rows` ([k] long indices)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows)

        return AdvantageInputs(
            rewards={k: v.index_select(0, rows) for k, v in self.rewards.items()}, loss_mask=pick(self.loss_mask),
            group_ids=pick(self.group_ids), cfg=self.cfg, turn_ids=pick(self.turn_ids), values=pick(self.values),
            expert_mask=pick(self.expert_mask),
        )


class AdvantageFn(Protocol):
    def __call__(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        ...
