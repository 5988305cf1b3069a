"""What runs inside the Ray actors: one train rank (a DeepSpeed engine on its share of each
mini-batch) or one rollout engine. They wrap the very objects an in-process run uses."""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import torch

from llmrl.algorithms.base import Batch, LossContext, LossFn


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _where() -> dict[str, str]:
    import ray

    return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}


class FaultHook:
    """Test hook for the failure tests: LLMRL_TEST_FAULT="role:index:method:action:after" makes the
    actor `role` number `index` exit (action `exit`) or hang (`sleep=S`) on its `after`-th call
    of `method` (1-based). Unset in every real run: then it does nothing."""

    def __init__(self, role: str, index: int) -> None:
        self.spec = None
        raw = os.environ.get("LLMRL_TEST_FAULT", "")
        if raw:
            want_role, want_index, method, action, after = raw.split(":")
            if (want_role, int(want_index)) == (role, index):
                self.spec = (method, action, int(after))
        self.calls: dict[str, int] = {}

    def __call__(self, method: str) -> None:
        if self.spec is None or self.spec[0] != method:
            return
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] != self.spec[2]:
            return
        action = self.spec[1]
        if action == "exit":
            os._exit(1)
        import time

        time.sleep(float(action.split("=")[1]))


def _recipe(recipe_dict: dict[str, Any]) -> Any:
    from llmrl.recipe import Recipe

    return Recipe.model_validate(recipe_dict)


class TrainRank:
    """One data-parallel rank. `build` joins the DeepSpeed group (every rank at once)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.engine: Any = None
        self.weight_group: Any = None
        self.fault = FaultHook("train", rank)

    def where(self) -> dict[str, str]:
        from llmrl.distributed.weight_broadcast import free_port

        return {**_where(), "free_port": str(free_port())}

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def build(self, recipe_dict: dict[str, Any], total_updates: int, role: str, master_addr: str, master_port: int) -> None:
        from llmrl.distributed.cluster import build_local_train_engine
        from llmrl.loop import seed_everything

        os.environ.update(
            {"RANK": str(self.rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(self.world), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
        )
        recipe = _recipe(recipe_dict)
        seed_everything(recipe.seed)  # as the driver does before building its engines
        self.engine = build_local_train_engine(recipe, total_updates, role)

    def forward(self, batch: Batch, want: set[str], reference: bool, micro_batch_size: int | None) -> dict[str, torch.Tensor] | None:
        """Every rank computes a share and all get every row (DeepSpeedTrainEngine.forward); rank 0
        alone sends them back."""
        outputs = self.engine.forward(batch, want, reference=reference, micro_batch_size=micro_batch_size)
        return outputs if self.rank == 0 else None

    def step(self, mini_batch: Batch, loss_fn: LossFn, ctx: LossContext, generator_state: torch.Tensor | None) -> tuple[dict[str, float], Any]:
        self.fault("step")
        if generator_state is not None:
            ctx.generator = torch.Generator().set_state(generator_state)
        metrics = self.engine.step(mini_batch, loss_fn, ctx)
        return metrics, ctx.generator.get_state() if ctx.generator is not None else None

    def open_weights(self, bucket_bytes: int) -> None:
        """Start iterating the full weights; `next_weight_bucket` walks them. Every rank is called
        (under ZeRO-3 each bucket is gathered from all of them); rank 0 returns the buckets."""
        takes_part = self.rank == 0 or self.engine.weights_need_every_rank
        self._weights = iter(self.engine.named_weights(bucket_bytes)) if takes_part else iter(())

    def next_weight_bucket(self) -> list[tuple[str, torch.Tensor]] | None:
        bucket = next(self._weights, None)
        if bucket is None or self.rank:
            return None
        # Copies: a parameter can be a view into DeepSpeed's flat buffer, and pickling a view ships
        # the whole buffer (measured: 21 GB for SmolLM2's buckets).
        return [(name, t.detach().clone()) for name, t in bucket]

    def save(self, directory: str) -> None:
        self.engine.save(Path(directory))

    def load(self, directory: str) -> None:
        self.engine.load(Path(directory))

    def save_policy(self, directory: str) -> None:
        self.engine.save_policy(Path(directory))

    def join_weight_group(self, host: str, port: int, world: int, timeout_s: float) -> None:
        from llmrl.distributed.weight_broadcast import stateless_gloo_group

        self.weight_group = stateless_gloo_group(host, port, 0, world, timeout_s)

    def send_weights(self, bucket_bytes: int) -> dict[str, int] | None:
        """Rank 0 broadcasts the weights to the engines and reports the bytes and its memory above
        where it started (under ZeRO-3 it holds each gathered bucket and its packed copy); under
        ZeRO-3 the other ranks iterate along, taking part in each gather."""
        from llmrl.distributed.memory import RssPeak
        from llmrl.distributed.weight_broadcast import send_buckets

        if self.rank:
            if self.engine.weights_need_every_rank:
                for _ in self.engine.named_weights(bucket_bytes):
                    pass
            return None
        with RssPeak() as peak:
            sent = send_buckets(self.weight_group, self.engine.named_weights(bucket_bytes))
        return {"bytes": sent, "peak_extra_bytes": peak.extra}


class RolloutWorker:
    """One rollout engine (hf or vllm) in its own process."""

    def __init__(self, recipe_dict: dict[str, Any], index: int) -> None:
        from llmrl.models import load_tokenizer
        from llmrl.rollout.base import build_rollout_engine

        recipe = _recipe(recipe_dict)
        tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision)
        # An engine-wide generator (vLLM) gets a seed of its own per engine, or engines handed
        # copies of one prompt would return the same samples.
        self.engine = build_rollout_engine(recipe.rollout, recipe.model, tokenizer, seed=recipe.seed + 1_000_033 * index)
        self.weight_group: Any = None
        self.version = 0
        self.fault = FaultHook("rollout", index)

    def where(self) -> dict[str, str]:
        return _where()

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def generate(self, prompt_ids: list[list[int]], sampling: Any) -> list[Any]:
        self.fault("generate")
        return self.engine.generate(prompt_ids, sampling)

    def generate_seeded(self, prompt_ids: list[list[int]], row_seeds: list[int], sampling: Any) -> list[Any]:
        """`generate` with one seed per prompt (SamplingParams.row_seeds), split with the prompts."""
        self.fault("generate")
        return self.engine.generate(prompt_ids, dataclasses.replace(sampling, row_seeds=row_seeds))

    def score(self, prefix_ids: list[list[int]], continuation_ids: list[list[int]], temperature: float) -> list[list[float]]:
        return self.engine.score(prefix_ids, continuation_ids, temperature)

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weights(bucket)

    def finish_weight_update(self) -> None:
        self.engine.finish_weight_update()

    def join_weight_group(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        from llmrl.distributed.weight_broadcast import stateless_gloo_group

        self.weight_group = stateless_gloo_group(host, port, rank, world, timeout_s)

    def receive_weights(self, version: int) -> dict[str, int]:
        """One broadcast sync, bracketed so the engine reloads once; returns bytes and the version."""
        from llmrl.distributed.weight_broadcast import receive_buckets

        received = 0
        self.engine.begin_weight_update()
        for bucket in receive_buckets(self.weight_group):
            self.engine.load_weights(bucket)
            received += sum(t.numel() * t.element_size() for _, t in bucket)
        self.engine.finish_weight_update()
        self.version = version
        return {"bytes": received, "version": self.version}
