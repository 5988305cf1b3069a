"""Trainer -> rollout weight sync, as an object built once from a registry (`rollout.weight_sync`).

`setup()` runs once before the first sync (a process-group backend forms its group there);
`sync(step)` pushes the trainer's full (merged) weights to every rollout engine and reports
bytes and seconds. `inprocess` hands each bucket to an engine in this process. A Ray backend
registers `broadcast` here, sending the same buckets over a process group.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from llmrl.registry import Registry

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass
class SyncStats:
    bytes: int
    seconds: float


class WeightSync(Protocol):
    def setup(self) -> None: ...

    def sync(self, step: int) -> SyncStats: ...


WEIGHT_SYNCS: Registry[Callable[..., WeightSync]] = Registry("weight sync")


@WEIGHT_SYNCS.register("inprocess")
class InProcessWeightSync:
    """The trainer and the rollout engines share this process: buckets are handed over directly."""

    def __init__(self, trainer: Any, engines: list[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.trainer = trainer
        self.engines = engines
        self.bucket_bytes = bucket_bytes

    def setup(self) -> None:
        pass  # nothing to connect: both sides live in this process

    def sync(self, step: int) -> SyncStats:
        started = time.perf_counter()
        sent = 0
        for engine in self.engines:
            engine.begin_weight_update()
        for bucket in self.trainer.named_weights(self.bucket_bytes):
            for engine in self.engines:
                engine.load_weights(bucket)
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
        # Engines that stage buckets (vllm) apply them here, so the time covers the whole swap.
        for engine in self.engines:
            engine.finish_weight_update()
        return SyncStats(bytes=sent, seconds=time.perf_counter() - started)


def build_weight_sync(name: str, trainer: Any, engines: list[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightSync:
    return WEIGHT_SYNCS[name](trainer, engines, bucket_bytes=bucket_bytes)
