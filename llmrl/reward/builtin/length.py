"""Length shaping rewards."""
from __future__ import annotations

from llmrl.reward import register_reward
from llmrl.types import Task, Trajectory


def overlong_penalty(length: int, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """DAPO overlong shaping (Yu et al. 2025, arXiv 2503.14476; verl reward_manager/dapo.py).

    `min(-(L - (max_len - buffer_len)) / buffer_len * factor, 0)`: 0 up to the start of the
    buffer, then linear down to -factor at max_len (and further below past it).
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"overlong needs 0 < buffer_len <= max_len, got {buffer_len} and {max_len}")
    exceed = length - (max_len - buffer_len)
    return min(-exceed / buffer_len * penalty_factor, 0.0)


@register_reward("overlong")
def overlong(
    completion: str,
    task: Task,
    trajectory: Trajectory,
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> float:
    """DAPO's length penalty over the response's policy tokens; add it to a task reward.

    `max_len` should equal the rollout's max new tokens; set both through the spec's kwargs.
    """
    return overlong_penalty(trajectory.num_policy_tokens, max_len, buffer_len, penalty_factor)
