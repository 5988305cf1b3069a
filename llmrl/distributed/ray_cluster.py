"""`cluster.backend: ray`: train ranks and rollout engines as Ray actors, behind proxies that
implement the TrainEngine and RolloutEngine protocols, so `loop.py` runs unchanged.

- Placement: one PACK placement group per role (colocated: on whatever node has room;
  disaggregated: bundles carry the role's `node_label` resource). The wait is bounded; on a
  timeout the error lists what was asked and what the cluster has.
- `RayTrainEngine` drives one actor per data-parallel rank. `step` hands every rank the whole
  mini-batch and each takes its share (`local_rows`); the loss denominators and the metrics are
  all-reduced inside DeepSpeed's group, so rank 0's metrics are the mini-batch's.
- `RayRolloutEngine` drives one actor per engine, spreading prompts by tokens and returning the
  completions in input order.
- Every remote wait goes through `ray_calls.gather`, bounded by `cluster.timeouts` (the peak
  memory report at shutdown through `ray_calls.answers`, which gives None rather than raising).
- Start-up: the rollout engines are started first and waited for last, so they load their
  model while the train ranks build theirs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from llmrl.algorithms.base import Batch, LossContext, LossFn
from llmrl.distributed.cluster import CLUSTERS
from llmrl.distributed.ray_actors import RolloutWorker, TrainRank
from llmrl.distributed.ray_calls import ActorHandle, ClusterError, answers, call, gather
from llmrl.fileio import write_atomically


def ray_missing() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError as err:
        return f"Ray is not importable ({err}): pip install -e '.[ray]'"
    return None


# An idle actor answers in milliseconds; this bounds how long a run's exit waits on a stuck one.
PEAK_RSS_WAIT_S = 10.0


@CLUSTERS.register("ray", requirement=ray_missing)
class RayCluster:
    def __init__(self, recipe: Any) -> None:
        import ray

        self.recipe = recipe
        self.cfg = recipe.cluster
        self._started_ray = False
        if not ray.is_initialized():
            if self.cfg.address:
                ray.init(address=self.cfg.address, log_to_driver=True)
            else:
                ray.init(num_cpus=self.cfg.num_cpus, object_store_memory=self.cfg.object_store_mb << 20, log_to_driver=True)
                self._started_ray = True
        self._groups: list[Any] = []
        self._placement: list[dict[str, Any]] = []
        self._handles: list[ActorHandle] = []
        self._rollout_start: tuple[list[ActorHandle], Any] | None = None
        self._recipe_dict = recipe.model_dump(mode="json")

    # ------------------------------------------------------------------ placement
    def _placement_group(self, role: str, count: int, num_cpus: float, num_gpus: float, node_label: str | None) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        bundle: dict[str, float] = {"CPU": num_cpus}
        if num_gpus:
            bundle["GPU"] = num_gpus
        if node_label and self.cfg.placement == "disaggregated":
            bundle[node_label] = 0.001
        group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
        try:
            ray.get(group.ready(), timeout=self.cfg.timeouts.placement_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise ClusterError(
                f"could not place {count} x {bundle} for the {role} within {self.cfg.timeouts.placement_s:g} s; "
                f"the cluster has {ray.cluster_resources()} of which {ray.available_resources()} are free"
            ) from None
        self._groups.append(group)
        return group

    def _actors(self, cls: type, role: str, count: int, resources: Any, args_for: Any) -> tuple[list[ActorHandle], Any]:
        """`count` actors of `cls`, one per bundle of a new placement group, and a function that
        starts a replacement for actor i in its bundle. The actors are started, not waited for:
        `_located` waits until each answers where it runs."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = self._placement_group(role, count, resources.num_cpus, resources.num_gpus, resources.node_label)
        remote_cls = ray.remote(cls)
        env = {"OMP_NUM_THREADS": str(max(1, int(resources.num_cpus))), "TOKENIZERS_PARALLELISM": "false"}
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        if "LLMRL_TEST_FAULT" in os.environ:  # the failure tests' hook (ray_actors.FaultHook)
            env["LLMRL_TEST_FAULT"] = os.environ["LLMRL_TEST_FAULT"]
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.recipe.rollout.vllm_cpu_kvcache_gib)

        def start(i: int) -> ActorHandle:
            actor = remote_cls.options(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(*args_for(i))
            return ActorHandle(actor, f"{role} {i}")

        return [start(i) for i in range(count)], lambda i: self._located([start(i)], resources)[0]

    def _located(self, handles: list[ActorHandle], resources: Any) -> list[ActorHandle]:
        for handle, where in zip(handles, gather([(h, "where", (), {}) for h in handles], self.cfg.timeouts.start_s)):
            handle.host, handle.node_id = where["host"], where["node_id"]
            self._record_placement(handle, resources)
        return handles

    def _start_rollout_engines(self) -> tuple[list[ActorHandle], Any]:
        """The engine actors, started once. The first train engine starts them before its ranks
        build, so an engine loads its model while the ranks build theirs: measured on 2 cores,
        the two-node test's vLLM engine answered 22 s after the ranks' 13.6 s build, in series."""
        if self._rollout_start is None:
            engines = self.cfg.rollout_engines
            self._rollout_start = self._actors(RolloutWorker, "rollout engine", engines.count, engines, lambda i: (self._recipe_dict, i))
        return self._rollout_start

    def _record_placement(self, handle: ActorHandle, resources: Any) -> None:
        """Where each actor runs, on stderr and in output_dir/cluster.json (a restart adds a row),
        with its memory estimate; shutdown adds the peak RSS it reached."""
        import sys

        from llmrl.distributed.memory import estimate_gib

        row = {"role": handle.role, "host": handle.host, "node_id": handle.node_id, "num_cpus": resources.num_cpus,
               "num_gpus": resources.num_gpus, "estimate_gib": estimate_gib(self.recipe, handle.role)}
        self._placement.append(row)
        self._handles.append(handle)
        print(f"placed {handle.role} on {handle.host} (node {handle.node_id[:12]})", file=sys.stderr)
        self._write_placement()

    def _write_placement(self) -> None:
        import json

        out = Path(self.recipe.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "cluster.json", json.dumps(self._placement, indent=1) + "\n")

    def _record_peak_memory(self) -> None:
        """Each actor's peak RSS into cluster.json, beside its estimate; None for a dead one, or
        a stuck one still busy in the call that ended the run. All are asked at once within one
        short wait, so a stuck actor does not hold up the exit (asked one at a time, a stuck
        engine cost 30 s)."""
        peaks = answers([(handle, "peak_rss", (), {}) for handle in self._handles], timeout=PEAK_RSS_WAIT_S)
        for row, peak in zip(self._placement, peaks):
            row["peak_rss_gib"] = None if peak is None else peak / (1 << 30)
        self._write_placement()

    # ------------------------------------------------------------------ Cluster protocol
    def train_engine(self, recipe: Any, total_updates: int, role: str) -> "RayTrainEngine":
        self._start_rollout_engines()
        workers = self.cfg.train_workers
        ranks, _ = self._actors(TrainRank, f"train rank ({role})", workers.count, workers, lambda i: (i, workers.count))
        return RayTrainEngine(self._located(ranks, workers), self._recipe_dict, total_updates, role, self.cfg.timeouts)

    def rollout_engine(self, recipe: Any, tokenizer: Any) -> "RayRolloutEngine":
        engines = self.cfg.rollout_engines
        handles, restart = self._start_rollout_engines()
        return RayRolloutEngine(self._located(handles, engines), restart, engines.max_restarts, self.cfg.timeouts)

    def shutdown(self) -> None:
        import ray

        self._record_peak_memory()
        for group in self._groups:
            ray.util.remove_placement_group(group)
        self._groups = []
        if self._started_ray:
            ray.shutdown()


class RayTrainEngine:
    """TrainEngine over a group of train-rank actors. Every call goes to every rank: forward
    passes are data-parallel, and under ZeRO-3 weights are gathered from all ranks; rank 0
    answers."""

    def __init__(self, ranks: list[ActorHandle], recipe_dict: dict[str, Any], total_updates: int, role: str, timeouts: Any) -> None:
        self.ranks = ranks
        self.timeouts = timeouts
        first = call(ranks[0], "where", timeout=timeouts.start_s)
        master = (first["ip"], int(first["free_port"]))
        gather([(r, "build", (recipe_dict, total_updates, role, *master), {}) for r in ranks], timeouts.start_s)

    def _all(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """`method(*args)` on every rank; rank 0's answer."""
        return gather([(r, method, args, {}) for r in self.ranks], timeout or self.timeouts.call_s)[0]

    def forward(self, batch: Batch, want: set[str], reference: bool = False, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        return self._all("forward", batch, want, reference, micro_batch_size)

    def step(self, mini_batch: Batch, loss_fn: LossFn, ctx: LossContext) -> dict[str, float]:
        state = ctx.generator.get_state() if ctx.generator is not None else None
        bare = dataclasses.replace(ctx, generator=None)
        results = gather([(r, "step", (mini_batch, loss_fn, bare, state), {}) for r in self.ranks], self.timeouts.call_s)
        metrics, new_state = results[0]
        if ctx.generator is not None and new_state is not None:
            ctx.generator.set_state(new_state)
        return metrics

    def named_weights(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The full weights one bucket at a time, through the object store (for export and tests;
        the weight sync broadcasts instead)."""
        self._all("open_weights", bucket_bytes)
        while (bucket := self._all("next_weight_bucket")) is not None:
            yield bucket

    def save_policy(self, directory: Path) -> None:
        self._all("save_policy", str(directory))

    def save(self, directory: Path) -> None:
        self._all("save", str(directory))

    def load(self, directory: Path) -> None:
        self._all("load", str(directory))


def engine_sampling(sampling: Any, engine_index: int) -> Any:
    """Engine k's sampling: its own seed, so two engines given copies of one prompt (a group split
    between them) never draw the same random stream. Engine 0 keeps the seed: one engine samples
    exactly what an in-process run samples."""
    if engine_index == 0 or sampling.seed is None or sampling.row_seeds is not None:
        return sampling  # row seeds already differ per row, and must not depend on the engine
    return dataclasses.replace(sampling, seed=sampling.seed + 104_729 * engine_index)


def balance_by_tokens(lengths: list[int], engines: int) -> list[list[int]]:
    """Prompt indices per engine: longest first, each to the engine with the fewest tokens so far
    (ties to the lower index), so engines finish together however prompt lengths vary."""
    shares: list[list[int]] = [[] for _ in range(engines)]
    load = [0] * engines
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = min(range(engines), key=lambda e: (load[e], e))
        shares[target].append(index)
        load[target] += lengths[index]
    return [sorted(share) for share in shares]


class RayRolloutEngine:
    """RolloutEngine over engine actors: prompts spread by tokens, results in input order.

    An engine that dies is restarted in its bundle (at most `max_restarts` times in a run); the
    weight sync then re-forms its group and brings the new engine to the current weights
    (`on_restart`), and the call is submitted again. One death more is a ClusterError."""

    def __init__(self, engines: list[ActorHandle], restart: Any, max_restarts: int, timeouts: Any) -> None:
        self.engines = engines
        self.restart = restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self.timeouts = timeouts
        self.on_restart: Any = None  # set by a weight sync that must reach every engine

    def metrics(self) -> dict[str, float]:
        return {"rollout/restarts": float(self.restarts)}

    def _gather(self, calls: list[tuple[ActorHandle, str, tuple, dict]], timeout: float) -> list[Any]:
        while True:
            try:
                return gather(calls, timeout)
            except ClusterError as err:
                if err.kind != "died" or self.restarts >= self.max_restarts:
                    if err.kind == "died":
                        raise ClusterError(f"{err} (after {self.restarts} restart(s); cluster.rollout_engines.max_restarts is {self.max_restarts})", err.kind) from None
                    raise
                index = next(i for i, e in enumerate(self.engines) if e is err.handle)
                self.engines[index] = self.restart(index)
                self.restarts += 1
                if self.on_restart is not None:
                    self.on_restart()
                calls = [(self.engines[index] if h is err.handle else h, m, a, kw) for h, m, a, kw in calls]

    def _spread(self, method: str, columns: list[list[Any]], tokens: list[int], *args: Any, per_engine: Any = None) -> list[Any]:
        """`method(*columns_share, *args)` on each engine with a share of the rows (balanced by
        `tokens`, each row's cost); the per-row results back in row order. `per_engine(k)`, when
        given, replaces `args` for engine k."""
        shares = balance_by_tokens(tokens, len(self.engines))
        assigned = [(k, engine, share) for k, (engine, share) in enumerate(zip(self.engines, shares)) if share]
        calls = [
            (engine, method, (*[[column[i] for i in share] for column in columns], *(per_engine(k) if per_engine else args)), {})
            for k, engine, share in assigned
        ]
        out: list[Any] = [None] * len(tokens)
        for (_, _, share), part in zip(assigned, self._gather(calls, self.timeouts.call_s)):
            for i, value in zip(share, part):
                out[i] = value
        return out

    def generate(self, prompt_ids: list[list[int]], sampling: Any) -> list[Any]:
        tokens = [len(p) + sampling.max_new_tokens for p in prompt_ids]
        if sampling.row_seeds is not None:  # each row's seed travels with the row to its engine
            base = dataclasses.replace(sampling, row_seeds=None)
            return self._spread("generate_seeded", [prompt_ids, list(sampling.row_seeds)], tokens, base)
        return self._spread("generate", [prompt_ids], tokens, per_engine=lambda k: (engine_sampling(sampling, k),))

    def score(self, prefix_ids: list[list[int]], continuation_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        tokens = [len(p) + len(c) for p, c in zip(prefix_ids, continuation_ids)]
        return self._spread("score", [prefix_ids, continuation_ids], tokens, temperature)

    # Weight updates through the object store, for tests and tools; runs use `broadcast`.
    def begin_weight_update(self) -> None:
        self._gather([(e, "begin_weight_update", (), {}) for e in self.engines], self.timeouts.sync_s)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        bucket = list(named_tensors)
        self._gather([(e, "load_weights", (bucket,), {}) for e in self.engines], self.timeouts.sync_s)

    def finish_weight_update(self) -> None:
        self._gather([(e, "finish_weight_update", (), {}) for e in self.engines], self.timeouts.sync_s)
