"""DeepSpeed ZeRO train engine (`train.backend: deepspeed`): one per data-parallel rank.

It is the torch engine with DeepSpeed making, reducing and applying the gradients; forward
passes, losses and metrics are shared. Each rank gets its own share of a mini-batch as
micro-batches. Normalisation stays global: the loss denominators are all-reduced before the
first backward, so every rank divides by the token count of the whole mini-batch, and the
loss is multiplied by the world size because DeepSpeed averages gradients over ranks. So N
ranks make the same update as one rank on the same mini-batch (tests/test_deepspeed_engine.py).
Every rank is handed the whole mini-batch and takes its contiguous share in `local_rows`.

Ranks must run the same number of micro-batches (each backward takes part in collectives), so
zero-advantage row skipping is off here; with several ranks the shared-prompt forward is off too
(see __init__). Process-group setup is the caller's (environment
variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun, the deepspeed launcher or a
Ray actor set them); CPU runs use gloo.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmrl.algorithms.base import Batch
from llmrl.batch import select_rows
from llmrl.precision import resolve_precision
from llmrl.train.engine import TrainConfig
from llmrl.train.torch_engine import TRAINER_STATE, TorchTrainEngine, lr_lambda


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for a train section. Micro-batching and gradient accumulation
    stay ours (one DeepSpeed "micro-batch" per step; the accumulation boundary is set by hand)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(cfg.precision) == "bf16"},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused CPU Adam needs a compiled extension; torch's is exact.
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def init_process_group() -> None:
    """Join the data-parallel group described by the environment (gloo without CUDA). Without
    one (a plain `llmrl train`), this process is a group of one on localhost."""
    import os
    import socket

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedTrainEngine(TorchTrainEngine):
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_updates: int, **options: Any) -> None:
        """`options` as TorchTrainEngine's (temperature, reference)."""
        init_process_group()
        import deepspeed
        import torch.distributed as dist

        updates: dict[str, Any] = {"skip_zero_advantage_rows": False}
        if dist.get_world_size() > 1:
            # Measured: with 2 ranks, the shared-prompt forward (two decoder calls joined through
            # the KV cache) made a different update than 1 rank (loss 0.08513 against 0.08539 on
            # the tiny model; 0.08541 both ways without it), so several ranks run the plain forward.
            updates["shared_prompt_forward"] = False
        cfg = cfg.model_copy(update=updates)
        super().__init__(model, cfg, total_updates, **options)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=self.params,
            config=deepspeed_config(cfg),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_updates)),
        )
        self.world_size = dist.get_world_size()
        self._boundary_reached = False

    def local_rows(self, mini_batch: Batch) -> Batch:
        import torch.distributed as dist

        rows = mini_batch["input_ids"].shape[0]
        if rows % self.world_size:
            raise ValueError(f"a mini-batch of {rows} rows does not split over {self.world_size} data-parallel ranks")
        share = rows // self.world_size
        rank = dist.get_rank()
        return select_rows(mini_batch, torch.arange(rank * share, (rank + 1) * share))

    def all_reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        if self.world_size == 1:
            return values
        # A rank may lack a name another has (no expert rows in its share): agree on the names first.
        names = sorted(values)
        gathered: list[list[str]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, names)
        names = sorted({n for rank_names in gathered for n in rank_names})
        summed = torch.tensor([values.get(n, 0.0) for n in names], dtype=torch.float64)
        dist.all_reduce(summed)
        return dict(zip(names, summed.tolist()))

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world_size)
        self._boundary_reached = last

    def _clip_gradients(self) -> float:
        if not self._boundary_reached:
            raise RuntimeError("the last micro-batch of a step ran no backward, so DeepSpeed never reduced the gradients")
        return 0.0  # DeepSpeed clips inside its step and reports the norm then

    def _optimizer_step(self) -> float | None:
        self.engine.step()
        self._boundary_reached = False
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def _discard_grads(self) -> None:
        self.engine.zero_grad()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (weights, ZeRO-partitioned optimizer, lr scheduler; every
        rank writes its shard) under deepspeed/, counters in trainer_state.pt. Collective."""
        self.engine.save_checkpoint(str(Path(directory) / "deepspeed"), tag="state")
        torch.save(self._counters(), Path(directory) / TRAINER_STATE)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(Path(directory) / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"checkpoint {directory} has no DeepSpeed state (was it written by train.backend=torch?)")
        counters = torch.load(Path(directory) / TRAINER_STATE, weights_only=False)
        self.nonfinite_streak = counters["nonfinite_streak"]
        self.skipped_updates = counters["skipped_updates"]
        self.updates = counters["updates"]

    def _counters(self) -> dict[str, int]:
        return {"nonfinite_streak": self.nonfinite_streak, "skipped_updates": self.skipped_updates, "updates": self.updates}
