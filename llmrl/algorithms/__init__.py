"""Algorithms: advantage estimators, losses, KL estimators, entropy control and presets.

Each is a registry a new entry joins with one decorator (or `register_preset` call):
ADVANTAGES (`register_advantage`), LOSSES (`register_loss`), KL_ESTIMATORS (`register_kl`),
ENTROPY_CONTROLS (`register_entropy_control`), AGG_MODES (`register_agg_mode`), PRESETS
(`register_preset`). The loop reads only these names; it never branches on an algorithm.
"""
from llmrl.algorithms.advantages import (
    ADVANTAGES,
    dynamic_sampling_keep,
    gae_advantages_and_returns,
    mask_truncated,
    masked_whiten,
    register_advantage,
    scalar_rewards,
)
from llmrl.algorithms.aggregation import AGG_MODES, agg_denominator, agg_sum, aggregate, register_agg_mode
from llmrl.algorithms.config import AlgorithmConfig, needs_reference, resolve_algorithm
from llmrl.algorithms.entropy import ENTROPY_CONTROLS, register_entropy_control
from llmrl.algorithms.kl import KL_ESTIMATORS, kl_penalty, kl_reward_channel, register_kl
from llmrl.algorithms.losses import LOSSES, register_loss
from llmrl.algorithms.presets import PRESETS, AlgorithmPreset, get_preset, register_preset

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "ENTROPY_CONTROLS",
    "KL_ESTIMATORS",
    "LOSSES",
    "PRESETS",
    "AlgorithmConfig",
    "AlgorithmPreset",
    "agg_denominator",
    "agg_sum",
    "aggregate",
    "dynamic_sampling_keep",
    "gae_advantages_and_returns",
    "get_preset",
    "kl_penalty",
    "kl_reward_channel",
    "mask_truncated",
    "masked_whiten",
    "needs_reference",
    "register_advantage",
    "register_agg_mode",
    "register_entropy_control",
    "register_kl",
    "register_loss",
    "register_preset",
    "resolve_algorithm",
    "scalar_rewards",
]
