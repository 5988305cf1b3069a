"""What `llmrl validate` checks on this machine before a launch, beyond the recipe's schema:

- the training data can be read: a local path exists and parses, a hub dataset is reachable or
  cached (the same code `llmrl train` runs, on one row), so a typo'd path or an offline node is
  caught before a cluster job queues. A failure is an error (exit 2), as it would be in training;
- the GPUs the recipe asks for (tensor parallelism, Ray actors' `num_gpus`) against the GPUs this
  machine sees. Validating on a laptop for a GPU cluster is normal, so this is a warning.
"""
from __future__ import annotations

import math
from typing import Any

from llmrl.data.builtin import TaskType, get_task_type


def check_training_data(recipe: Any) -> None:
    """Raise DataConfigError as `llmrl train` would; types that generate their data are skipped."""
    task_type = get_task_type(recipe.data.type)
    if type(task_type).load_rows is not TaskType.load_rows:
        return  # arithmetic, multihop: built in memory, nothing to find
    task_type.load_rows(recipe.data.model_copy(update={"limit": 1}), recipe.data.split)


def gpus_needed(recipe: Any) -> int:
    rollout, cluster = recipe.rollout, recipe.cluster
    if cluster.backend == "none":
        return rollout.tensor_parallel_size if rollout.engine == "vllm" and rollout.tensor_parallel_size > 1 else 0
    train = cluster.train_workers.count * cluster.train_workers.num_gpus
    engines = cluster.rollout_engines.count * max(cluster.rollout_engines.num_gpus, rollout.tensor_parallel_size if rollout.engine == "vllm" and cluster.rollout_engines.num_gpus else 0)
    return math.ceil(train + engines)


def resource_warnings(recipe: Any, visible_gpus: int | None = None) -> list[str]:
    if visible_gpus is None:
        import torch

        visible_gpus = torch.cuda.device_count()
    needed = gpus_needed(recipe)
    if needed <= visible_gpus:
        return []
    where = "one node" if recipe.cluster.backend == "none" else "the Ray cluster"
    return [
        f"warning: the recipe needs {needed} GPU(s) on {where}; this machine sees {visible_gpus}. "
        "Fine if it is not the machine the run will use; here, training would fail to place the engines"
    ]
