"""The PPO critic: a value model with its own train engine and optimizer, and the targets it is fit to.

As verl (and unlike TRL's shared loss), the critic is a separate model stepped by a separate
optimizer at `algorithm.critic_lr`; every other optimizer knob follows `train.*`.
"""
from __future__ import annotations

from typing import Any

import torch

from llmrl.algorithms.advantages import gae_advantages_and_returns
from llmrl.algorithms.base import reward_channels, total_token_rewards
from llmrl.models import load_causal_lm
from llmrl.train.backends import build_train_backend
from llmrl.train.engine import TrainEngine
from llmrl.train.value_model import ValueModel


def build_critic_engine(recipe: Any, algo: Any, total_updates: int) -> TrainEngine:
    """A value model on `algorithm.critic_model` (default: the policy's model), trained in full
    even when the policy uses LoRA: the value head starts from scratch and needs the capacity."""
    lm = load_causal_lm(recipe.model.model_copy(update={"name": algo.critic_model or recipe.model.name}))
    if recipe.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    critic = ValueModel(lm)
    # Values need every position's hidden state, so the shared-prompt forward does not apply.
    train_cfg = recipe.train.model_copy(update={"lr": algo.critic_lr, "shared_prompt_forward": False})
    return build_train_backend(recipe.train.backend, critic, train_cfg, total_updates=total_updates)


def old_values(critic: TrainEngine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The critic's values before this step's update: GAE's baseline and the value clip's centre."""
    return critic.forward(batch, {"values"})["values"]


def value_targets(batch: dict[str, torch.Tensor], algo: Any) -> torch.Tensor:
    """The GAE returns (un-whitened advantages + old values) that the value loss fits."""
    _, returns = gae_advantages_and_returns(
        total_token_rewards(reward_channels(batch)), batch["old_values"], batch["loss_mask"], algo.gamma, algo.lam, whiten=False
    )
    return returns
