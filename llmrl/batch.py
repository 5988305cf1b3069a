"""Trajectories -> padded tensors, and the row/column slicing the update needs.

One right-padded batch holds the whole step; mini-batches and micro-batches are row subsets of
it, each trimmed to its own longest row so short micro-batches do not pay for the longest one.
Masks come from spans (see types.Trajectory.policy_mask), never from pad ids.
"""
from __future__ import annotations

from typing import Iterator

import torch

from llmrl.algorithms.base import REWARD_PREFIX, Batch
from llmrl.types import OUTCOME, Trajectory

ROW_KEYS = ("group_ids", "expert_mask", "truncated")


def collate(trajectories: list[Trajectory], pad_id: int) -> Batch:
    """Pad to the longest trajectory. Each reward channel becomes `rewards/<channel>` [B,T] with
    the trajectory's entries at their token positions (`rewards/outcome` is always present).
    `loss_mask` carries the policy spans' loss weights; `expert_mask` marks expert rows.
    """
    B = len(trajectories)
    T = max(len(t.token_ids) for t in trajectories)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    rollout_logprobs = torch.zeros((B, T), dtype=torch.float32)
    channels = {OUTCOME} | {e.channel for t in trajectories for e in t.rewards}
    rewards = {c: torch.zeros((B, T), dtype=torch.float32) for c in sorted(channels)}
    turn_ids = torch.zeros((B, T), dtype=torch.long)
    for i, traj in enumerate(trajectories):
        n = len(traj.token_ids)
        input_ids[i, :n] = torch.tensor(traj.token_ids)
        attention[i, :n] = 1
        mask = torch.tensor(traj.policy_mask, dtype=torch.float32)
        loss_mask[i, :n] = mask
        rollout_logprobs[i, :n] = torch.tensor(traj.rollout_logprobs, dtype=torch.float32)
        for entry in traj.rewards:
            rewards[entry.channel][i, entry.position] += entry.value
        turn = 0
        ends = sorted(traj.turn_ends)
        for pos in range(n):
            turn_ids[i, pos] = turn
            if turn < len(ends) and pos == ends[turn]:
                turn += 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "loss_mask": loss_mask,
        "rollout_logprobs": rollout_logprobs,
        **{REWARD_PREFIX + c: r for c, r in rewards.items()},
        "turn_ids": turn_ids,
        "group_ids": torch.tensor([t.group_id for t in trajectories], dtype=torch.long),
        "expert_mask": torch.tensor([t.expert for t in trajectories], dtype=torch.bool),
        "truncated": torch.tensor([t.finish_reason == "length" for t in trajectories], dtype=torch.bool),
    }


def select_rows(batch: Batch, rows: torch.Tensor | list[int]) -> Batch:
    """Rows `rows` of every tensor, trimmed to the longest selected row."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    out = {k: v.index_select(0, idx) for k, v in batch.items()}
    width = int(out["attention_mask"].sum(-1).max()) if len(idx) else 0
    return {k: (v if v.dim() == 1 or k in ROW_KEYS else v[:, :width]) for k, v in out.items()}


def split_micro_batches(batch: Batch, micro_batch_size: int | None, micro_batch_tokens: int | None) -> list[Batch]:
    """Split rows into micro-batches by row count, or by padded token budget.

    With a token budget, rows are sorted by length first so similar lengths share a
    micro-batch and little compute goes to padding (row order does not change the update).
    """
    lengths = batch["attention_mask"].sum(-1)
    n = len(lengths)
    if micro_batch_tokens:
        order = torch.argsort(lengths, descending=True).tolist()
        groups: list[list[int]] = []
        current: list[int] = []
        for row in order:
            width = max([int(lengths[row])] + [int(lengths[r]) for r in current])
            if current and width * (len(current) + 1) > micro_batch_tokens:
                groups.append(current)
                current = []
            current.append(row)
        if current:
            groups.append(current)
    else:
        size = micro_batch_size or n
        groups = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return [select_rows(batch, g) for g in groups]


def iter_mini_batches(
    num_rows: int, mini_batch_size: int, generator: torch.Generator | None = None, strata: torch.Tensor | None = None
) -> Iterator[list[int]]:
    """Row indices of each mini-batch, shuffled when a generator is given. With `strata` ([B]
    bool: CHORD's expert rows) mini_batch_size counts the other (on-policy) rows, and the strata
    rows are dealt out over the same number of mini-batches, so each holds the step's share of
    both (within one row)."""
    order = torch.randperm(num_rows, generator=generator).tolist() if generator is not None else list(range(num_rows))
    if strata is None or not bool(strata.any()) or bool(strata.all()):
        for start in range(0, num_rows, mini_batch_size):
            yield order[start : start + mini_batch_size]
        return
    kinds = [[r for r in order if bool(strata[r]) == kind] for kind in (False, True)]
    count = max(1, -(-len(kinds[0]) // mini_batch_size))
    for index in range(count):
        yield [r for rows in kinds for r in rows[len(rows) * index // count : len(rows) * (index + 1) // count]]


def num_tokens(batch: Batch) -> int:
    return int(batch["attention_mask"].sum())


def on_policy_mask(batch: Batch) -> torch.Tensor:
    """`loss_mask` with expert rows (CHORD's demonstrations, never sampled) zeroed: the tokens whose
    rollout logprobs and KL to the reference mean something."""
    expert = batch.get("expert_mask")
    if expert is None or not bool(expert.any()):
        return batch["loss_mask"]
    return batch["loss_mask"] * (~expert.bool())[:, None]


ROLLOUT_GAP = "rollout/logprob_diff"


def rollout_gap_sums(batch: Batch, trainer_logprobs: torch.Tensor) -> tuple[float, float]:
    """Sum over the sampled policy tokens of |rollout engine logprob - trainer logprob|, and the
    number of those tokens: `rollout/logprob_diff` is their ratio. Expert rows were not sampled."""
    sampled = on_policy_mask(batch)
    gap = (trainer_logprobs.double() - batch["rollout_logprobs"].double()).abs() * sampled
    return float(gap.sum()), float(sampled.sum())
