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
    peak_extra_bytes: int | None = None  # the sender's RSS above where the sync started, when measured
    check_gaps: tuple[float, float] | None = None  # rollout.check_sync: probe gaps before and after

    def metrics(self) -> dict[str, float]:
        out = {"sync/bytes": float(self.bytes)}
        if self.peak_extra_bytes is not None:
            out["sync/sender_peak_extra_mib"] = self.peak_extra_bytes / (1 << 20)
        if self.check_gaps is not None:
            out["sync/check_gap_before"], out["sync/check_gap_after"] = self.check_gaps
        return out


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


def weight_sync_for(rollout: Any, trainer: Any, engines: list[Any]) -> WeightSync:
    """The sync a rollout section asks for: its kind, bucket size, and the optional probe check."""
    sync = build_weight_sync(rollout.weight_sync, trainer, engines, bucket_bytes=rollout.sync_bucket_mb << 20)
    if rollout.check_sync:
        from llmrl.distributed.sync_check import CheckedWeightSync

        sync = CheckedWeightSync(sync, trainer, engines, rollout.temperature)
    return sync


@WEIGHT_SYNCS.register("broadcast")
class BroadcastWeightSync:
    """Train rank 0 broadcasts packed buckets over a gloo group it shares with every rollout
    engine actor (llmrl/distributed/weight_broadcast.py). For `cluster.backend: ray`. A restarted
    engine makes it re-form the group and send the current weights again before the engine serves."""

    def __init__(self, trainer: Any, engines: list[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if not hasattr(trainer, "ranks") or not all(hasattr(e, "engines") for e in engines):
            raise ValueError("rollout.weight_sync 'broadcast' needs cluster.backend: ray (its engines live in other processes)")
        self.trainer = trainer
        self.engines = engines
        self.bucket_bytes = bucket_bytes
        self.timeout = trainer.timeouts.sync_s
        self.version = 0  # the step whose weights the engines serve (0: the initial ones)

    @property
    def actors(self) -> list[Any]:
        return [actor for engine in self.engines for actor in engine.engines]

    def setup(self) -> None:
        self._form_group()
        for engine in self.engines:
            engine.on_restart = self._after_restart

    def _form_group(self) -> None:
        """Rank 0 hosts the rendezvous; every member joins at once."""
        from llmrl.distributed.ray_calls import call, gather

        sender, actors = self.trainer.ranks[0], self.actors
        where = call(sender, "where", timeout=self.timeout)
        host, port, world = where["ip"], int(where["free_port"]), 1 + len(actors)
        joins = [(sender, "join_weight_group", (host, port, world, self.timeout), {})]
        joins += [(a, "join_weight_group", (host, port, i + 1, world, self.timeout), {}) for i, a in enumerate(actors)]
        gather(joins, self.timeout)

    def _after_restart(self) -> None:
        self._form_group()
        if self.version:  # a fresh engine loads the initial weights itself
            self._send(self.version)

    def sync(self, step: int) -> SyncStats:
        started = time.perf_counter()
        sent = self._send(step)
        return SyncStats(bytes=sent["bytes"], seconds=time.perf_counter() - started, peak_extra_bytes=sent["peak_extra_bytes"])

    def _send(self, version: int) -> dict[str, int]:
        """Rank 0 sends; under ZeRO-3 the other ranks take part in gathering each bucket."""
        from llmrl.distributed.ray_calls import ClusterError, gather

        actors, ranks = self.actors, self.trainer.ranks
        calls = [(rank, "send_weights", (self.bucket_bytes,), {}) for rank in ranks]
        calls += [(a, "receive_weights", (version,), {}) for a in actors]
        results = gather(calls, self.timeout)
        sent, received = results[0], results[len(ranks):]
        for actor, got in zip(actors, received):
            if got["version"] != version or got["bytes"] != sent["bytes"]:
                raise ClusterError(
                    f"{actor.role} on {actor.host}: weight sync for step {version} delivered {got['bytes']} of {sent['bytes']} bytes "
                    f"(engine reports version {got['version']})"
                )
        self.version = version
        return sent
