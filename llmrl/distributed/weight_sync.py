"""Trainer -> rollout weight sync. In one process it is a bucketed in-place copy; the Ray
backends broadcast the same buckets over a process group."""
from __future__ import annotations

from typing import Any


def sync_weights(trainer: Any, rollout: Any, bucket_bytes: int = 256 << 20) -> int:
    """Push the trainer's full (merged) weights to the rollout engine; return bytes sent."""
    sent = 0
    for bucket in trainer.named_weights(bucket_bytes):
        rollout.load_weights(bucket)
        sent += sum(t.numel() * t.element_size() for _, t in bucket)
    # Engines that stage buckets (vllm) apply them here, so time/sync covers the whole swap.
    finish = getattr(rollout, "finish_weight_update", None)
    if finish is not None:
        finish()
    return sent
