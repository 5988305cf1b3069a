"""A reward any policy can learn quickly, for the learning smoke test.

No answer checking: it only rewards using a fixed tenth of the vocabulary, so a few steps of RL on
a tiny model should visibly raise it.
"""
from __future__ import annotations

from llmrl.reward import register_reward
from llmrl.types import Task, Trajectory

# Token ids with id % 10 == 0: about 10% of any vocabulary, spread over it rather than one block.
TOKEN_MODULUS = 10


def is_rewarded_token(token_id: int) -> bool:
    return token_id % TOKEN_MODULUS == 0


@register_reward("toy_token_fraction")
def toy_token_fraction(completion: str, task: Task, trajectory: Trajectory) -> float:
    """Fraction of the trajectory's policy tokens whose id is a multiple of 10 (0.0 if none)."""
    policy_ids = [
        token_id
        for span in trajectory.spans
        if span.role == "policy"
        for token_id in trajectory.token_ids[span.start : span.end]
    ]
    if not policy_ids:
        return 0.0
    return sum(map(is_rewarded_token, policy_ids)) / len(policy_ids)
