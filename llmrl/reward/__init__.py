"""Reward API: how reward functions are named, configured, called and kept from hurting the run.

A reward is a plain function `fn(completion: str, task: Task, **kw) -> float | dict`. It is named
in a recipe as a registered name (`gsm8k`), a file (`path/to/file.py:fn`), a module function
(`package.module:fn`) or an entry point in the group `llmrl.rewards`. `RewardComputer` runs the
configured functions over a batch of trajectories in sandboxed worker processes with a per-call
timeout and a per-step budget, combines them by weight, and turns every failure of user code
(exception, hang, crash, NaN, wrong type) into the configured fallback score plus a counter; only a
function that fails on every call for several steps in a row ends the run.

Modules: `registry` (names, plugin resolution), `config` (the recipe section), `pool` (worker
processes and timeouts), `sandbox` (the operating-system walls around a worker), `freed_heap`
(the trainer's freed heap out of a worker's reach, for its memory limit), `computer`
(RewardComputer), `builtin` (the built-in rewards).
"""
from llmrl.reward.computer import (
    ACC_KEY,
    RewardComputer,
    RewardFailingError,
    RewardResult,
    check_reward_imports,
    response_text,
)
from llmrl.reward.config import OPTIONAL_KWARGS, RewardConfig, RewardFunctionSpec
from llmrl.reward.registry import (
    BUILTIN_REWARD_MODULES,
    ENTRY_POINT_GROUP,
    REWARDS,
    RewardConfigError,
    RewardFn,
    default_reward_for_kind,
    known_reward_names,
    register_reward,
    registered_rewards,
    resolve_reward,
    reward_needing_answer,
)

__all__ = [
    "ACC_KEY",
    "BUILTIN_REWARD_MODULES",
    "ENTRY_POINT_GROUP",
    "OPTIONAL_KWARGS",
    "REWARDS",
    "RewardComputer",
    "RewardConfig",
    "RewardConfigError",
    "RewardFn",
    "RewardFailingError",
    "RewardFunctionSpec",
    "RewardResult",
    "check_reward_imports",
    "default_reward_for_kind",
    "known_reward_names",
    "register_reward",
    "registered_rewards",
    "resolve_reward",
    "reward_needing_answer",
    "response_text",
]
