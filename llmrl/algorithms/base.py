"""The contracts between the loop, the train engine and the algorithm registries.

Tensors are token-aligned: for a padded batch of shape [B, T], position t of every per-token
tensor describes token t of `input_ids` (its logprob is log p(x_t | x_<t)); position 0 is never
a target and is always masked out.

Micro-batch keys (all torch tensors):
  input_ids [B,T] long, attention_mask [B,T] long, position_ids [B,T] long,
  loss_mask [B,T] float (1 on policy tokens only), old_logprobs [B,T], rollout_logprobs [B,T],
  ref_logprobs [B,T] (only when a reference is loaded), advantages [B,T], token_rewards [B,T],
  returns [B,T] and old_values [B,T] (critic algorithms only), group_ids [B] long,
  turn_ids [B,T] long, expert_mask [B] bool, response_lengths [B] long.
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


class AdvantageFn(Protocol):
    def __call__(
        self,
        token_rewards: torch.Tensor,
        loss_mask: torch.Tensor,
        group_ids: torch.Tensor,
        turn_ids: torch.Tensor,
        values: torch.Tensor | None,
        cfg: Any,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ...
