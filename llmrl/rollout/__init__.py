"""Rollout engines (generate / score / load_weights) and workflows (task -> trajectories)."""
from llmrl.rollout.base import ROLLOUT_ENGINES, RolloutConfig, RolloutEngine, SamplingParams, build_rollout_engine

__all__ = ["ROLLOUT_ENGINES", "RolloutConfig", "RolloutEngine", "SamplingParams", "build_rollout_engine"]
