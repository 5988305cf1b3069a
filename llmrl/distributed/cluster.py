"""Where the engines run: the recipe's `cluster` section and the cluster backends.

A cluster backend builds the policy's (and the critic's) TrainEngine and the RolloutEngine. The
loop only sees those protocols, so `cluster.backend: none` (everything in this process) and
`ray` (engines as Ray actors behind proxies) run the same `loop.py`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Protocol

from pydantic import Field

from llmrl.config_base import Section
from llmrl.registry import Registry, registered_name
from llmrl.rollout.base import RolloutEngine
from llmrl.train.engine import TrainEngine


def _load_ray_backend() -> None:
    import importlib

    importlib.import_module("llmrl.distributed.ray_cluster")


logger = logging.getLogger("llmrl.cluster")

CLUSTERS: Registry[Callable[[Any], "Cluster"]] = Registry("cluster backend", loader=_load_ray_backend)


class TrainWorkersConfig(Section):
    count: int = Field(1, ge=1, description="Data-parallel train ranks (DeepSpeed), one Ray actor each.")
    num_cpus: float = Field(1, gt=0, description="Logical CPUs each train rank reserves.")
    num_gpus: float = Field(0, ge=0, description="GPUs each train rank reserves (0 on CPU machines).")
    node_label: str | None = Field(None, description="A custom Ray node resource the train ranks must land on (disaggregated placement).")


class RolloutEnginesConfig(Section):
    count: int = Field(1, ge=1, description="Rollout engines, one Ray actor each; prompts are spread across them by tokens.")
    num_cpus: float = Field(1, gt=0, description="Logical CPUs each engine reserves.")
    num_gpus: float = Field(
        0, ge=0, description="GPUs each engine reserves (0 on CPU machines); at least rollout.tensor_parallel_size, which sets how many one engine shards over."
    )
    node_label: str | None = Field(None, description="A custom Ray node resource the engines must land on (disaggregated placement).")
    max_restarts: int = Field(
        1, ge=0, description="Times in a run a dead engine is restarted (then re-synced to the current weights, its prompts resubmitted) before the run stops."
    )


class ClusterTimeouts(Section):
    placement_s: float = Field(120.0, gt=0, description="Longest wait for the placement groups; past it the error lists what was asked and what the cluster has.")
    start_s: float = Field(600.0, gt=0, description="Longest wait for an actor to start and load its model (engines, train ranks).")
    call_s: float = Field(1800.0, gt=0, description="Longest wait for one remote call (generate, a train step...) before the run ends with an error naming the actor and method.")
    sync_s: float = Field(600.0, gt=0, description="Longest wait for one weight sync (and for forming its process group).")


class ClusterConfig(Section):
    backend: registered_name(CLUSTERS) = Field(
        "none", description="none: every engine in this process. ray: train ranks and rollout engines as Ray actors."
    )
    address: str | None = Field(
        None, description="ray: 'auto' joins the running cluster, 'host:port' a given one; empty starts a local Ray for this run."
    )
    placement: Literal["colocated", "disaggregated"] = Field(
        "colocated", description="ray: colocated shares the nodes' resources; disaggregated keeps train ranks and engines on the nodes their node_label names."
    )
    train_workers: TrainWorkersConfig = Field(default_factory=TrainWorkersConfig, description="ray: the train ranks.")
    rollout_engines: RolloutEnginesConfig = Field(default_factory=RolloutEnginesConfig, description="ray: the rollout engines.")
    timeouts: ClusterTimeouts = Field(default_factory=ClusterTimeouts, description="ray: bounds on every wait.")
    num_cpus: int | None = Field(
        None, ge=1, description="ray, local start only: logical CPUs the local Ray offers (declare more than the machine has on 2 cores, or actors never schedule)."
    )
    object_store_mb: int = Field(1024, ge=64, description="ray, local start only: object store size in MiB (weights never travel through it).")


class Cluster(Protocol):
    def train_engine(self, recipe: Any, total_updates: int, role: str) -> TrainEngine:
        """The engine for `role` ("policy" or "critic"), its model loaded where it runs."""

    def rollout_engine(self, recipe: Any, tokenizer: Any) -> RolloutEngine: ...

    def shutdown(self) -> None: ...


@CLUSTERS.register("none")
class LocalCluster:
    """Every engine in this process (the embedded default)."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        self.policy: TrainEngine | None = None

    def train_engine(self, recipe: Any, total_updates: int, role: str) -> TrainEngine:
        engine = build_local_train_engine(recipe, total_updates, role)
        if role == "policy":
            self.policy = engine
        return engine

    def rollout_engine(self, recipe: Any, tokenizer: Any) -> RolloutEngine:
        from llmrl.rollout.base import build_rollout_engine
        from llmrl.rollout.decode_outputs import link_decode_outputs

        engine = build_rollout_engine(recipe.rollout, recipe.model, tokenizer, seed=recipe.seed)
        if self.policy is not None:
            # both in this process: the update may take the decode's linear outputs
            why_not = link_decode_outputs(engine, self.policy, recipe.rollout.reuse_decode_outputs_mb)
            if why_not is not None:
                logger.info("the update recomputes the decode's products: %s", why_not)
        return engine

    def shutdown(self) -> None:
        pass


def build_local_train_engine(recipe: Any, total_updates: int, role: str) -> TrainEngine:
    """The policy's engine (with a frozen reference when a KL term needs one), or the critic's."""
    from llmrl.algorithms import needs_reference
    from llmrl.models import load_causal_lm, load_policy
    from llmrl.train.backends import build_train_backend
    from llmrl.train.critic import build_critic_engine

    if role == "critic":
        return build_critic_engine(recipe, recipe.algorithm, total_updates)
    policy = load_policy(recipe.model)
    reference = None
    if needs_reference(recipe.algorithm) and not recipe.model.lora.enabled:
        reference = load_causal_lm(recipe.model).eval().requires_grad_(False)
    return build_train_backend(
        recipe.train.backend, policy, recipe.train, total_updates=total_updates,
        temperature=recipe.rollout.temperature, reference=reference,
    )


def build_cluster(recipe: Any) -> Cluster:
    return CLUSTERS[recipe.cluster.backend](recipe)
