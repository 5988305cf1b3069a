"""DeepSpeed ZeRO train engine (`train.backend: deepspeed`): one per data-parallel rank.

It is the torch engine with DeepSpeed making, reducing and applying the gradients; forward
passes, losses and metrics are shared. Each rank gets its own share of a mini-batch as
micro-batches. Normalisation stays global: the loss denominators are all-reduced before the
first backward, so every rank divides by the token count of the whole mini-batch, and the
loss is multiplied by the world size because DeepSpeed averages gradients over ranks. So N
ranks make the same update as one rank on the same mini-batch (tests/test_deepspeed_engine.py).
Every rank is handed the whole mini-batch and takes its contiguous share in `local_rows`.

Ranks must run the same number of micro-batches (each backward takes part in collectives, and
under ZeRO-3 each forward too): zero-advantage row skipping is off here, a token-budget split is
evened out across ranks (`_micro_batches`), and the no-grad forward pads every rank's share to
the same rows. With several ranks the shared-prompt forward is off too (see __init__).

ZeRO-3 (`train.zero_stage: 3`) partitions the weights themselves. DeepSpeed gathers a module's
weights around its forward and backward; the chunked logprob pass reads the lm_head weight
outside lm_head's forward, so it runs as a module of its own with that weight registered to it
(llmrl/train/logprobs.py). Full weights (sync, export) are gathered one bucket at a time with
every rank taking part (`named_weights`). Process-group setup is the caller's (environment
variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun, the deepspeed launcher or a
Ray actor set them); CPU runs use gloo.
"""
from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any, Iterator

import torch

from llmrl.algorithms.base import Batch
from llmrl.batch import select_rows
from llmrl.models import is_lora
from llmrl.precision import resolve_precision
from llmrl.train.deepspeed_startup import import_muon_uncompiled, skip_shm_comm_build
from llmrl.train.engine import TrainConfig, each_tensor_once
from llmrl.train.logprobs import attach_token_logprobs
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

    lone = "RANK" not in os.environ
    if lone:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        # Leave the group before the interpreter tears down: exiting with gloo's threads still
        # attached aborted a finished ZeRO-3 rank in CI ("terminate called without an active
        # exception", exit -6) after its results were written.
        atexit.register(leave_process_group)
    if lone:
        # Children inherit the environment: a `llmrl train` started from here would read RANK as
        # a group to join and try to host its store on this process's port. DeepSpeed reads
        # LOCAL_RANK later (device names), and a LOCAL_RANK alone makes no child join anything.
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)


def leave_process_group() -> None:
    import sys

    import torch.distributed as dist

    vllm_groups = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_groups is not None and vllm_groups.model_parallel_is_initialized():
        return  # an in-process vLLM engine tears the groups down at exit; going first made it raise
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedTrainEngine(TorchTrainEngine):
    # A ZeRO-3 rank's heap fragmented with freed memory kept: peak RSS 5.0-5.5 GiB against 4.2
    # without, where `llmrl validate` estimates 3.75 (tests/test_ray_two_nodes.py).
    keeps_freed_memory = False

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
        if cfg.zero_stage == 3:
            if is_lora(model):
                raise ValueError("train.zero_stage=3 with model.lora is not supported: use ZeRO-2 for LoRA (its weights are small)")
            head_pass = attach_token_logprobs(model)
            deepspeed.zero.register_external_parameter(head_pass, model.get_output_embeddings().weight)
        import_muon_uncompiled()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=self.params,
            config=deepspeed_config(cfg),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_updates)),
        )
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.weights_need_every_rank = cfg.zero_stage == 3
        self._boundary_reached = False

    @torch.no_grad()
    def forward(self, batch: Batch, want: set[str], reference: bool = False, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Data-parallel: each rank computes a share of the rows, then all ranks exchange them, so
        every rank returns every row. Shares are padded (repeating row 0) to equal size, so all
        ranks run the same passes, which ZeRO-3's per-module gathers require."""
        if self.world_size == 1:
            return super().forward(batch, want, reference, micro_batch_size)
        import torch.distributed as dist

        rows, width = batch["input_ids"].shape
        share = -(-rows // self.world_size)
        mine = [r if r < rows else 0 for r in range(self.rank * share, (self.rank + 1) * share)]
        outputs = super().forward({k: v[mine] for k, v in batch.items()}, want, reference, micro_batch_size)
        result = {}
        for key in sorted(outputs):
            parts = [torch.empty(share, width, dtype=torch.float32) for _ in range(self.world_size)]
            dist.all_gather(parts, outputs[key].contiguous())
            result[key] = torch.cat(parts)[:rows]
        return result

    def _micro_batches(self, rows: Batch) -> list[Batch]:
        """As many micro-batches on every rank (a token-budget split can give ranks different
        counts): a rank short of the most splits its largest micro-batch in two until even. The
        loss denominators are the mini-batch's, so the split does not change the update."""
        parts = super()._micro_batches(rows)
        if self.world_size == 1:
            return parts
        import torch.distributed as dist

        most = torch.tensor([len(parts)])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        while len(parts) < int(most):
            largest = max(range(len(parts)), key=lambda i: parts[i]["input_ids"].shape[0])
            count = parts[largest]["input_ids"].shape[0]
            if count < 2:
                raise RuntimeError(f"cannot even out micro-batches: {len(parts)} here, {int(most)} on another rank")
            half = count // 2
            parts[largest : largest + 1] = [select_rows(parts[largest], list(range(half))), select_rows(parts[largest], list(range(half, count)))]
        return parts

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

    def _start_micro_batch(self) -> None:
        # What DeepSpeed's own engine.forward does first (we call the modules directly, for the
        # chunked logprobs): it closes the previous backward, so ZeRO adds this micro-batch's
        # gradients to the accumulated ones instead of overwriting them (measured under ZeRO-3:
        # without it only the last micro-batch's gradients survived).
        self.engine.optimizer.clear_backward_seen_flag()

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

    # ------------------------------------------------------------------ weights
    def named_weights(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Under ZeRO-3, collective: every rank iterates, and each bucket is gathered from all
        ranks' partitions for as long as the caller holds it, then released, so a sync holds one
        gathered bucket beyond the partitions, never the whole model. The tensors are valid until
        the next bucket is asked for: copy what you keep. Below stage 3 every rank holds full
        weights."""
        if not self.weights_need_every_rank:
            yield from super().named_weights(bucket_bytes)
            return
        import deepspeed

        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        # keep_vars: the Parameters themselves, so a tied pair is one object (partitions are empty)
        entries = list(each_tensor_once(self.model.state_dict(keep_vars=True).items(), id))
        for index, (name, tensor) in enumerate(entries):
            bucket.append((name, tensor))
            size += getattr(tensor, "ds_numel", tensor.numel()) * tensor.element_size()
            if size >= bucket_bytes or index == len(entries) - 1:
                unique = list({id(t): t for _, t in bucket if hasattr(t, "ds_id")}.values())
                with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
                    yield [(n, t.detach()) for n, t in bucket]
                bucket, size = [], 0

    def save_policy(self, directory: Path) -> None:
        """Rank 0 writes; under ZeRO-3 every rank must call this (the weights are gathered)."""
        if not self.weights_need_every_rank:
            if self.rank == 0:
                super().save_policy(directory)
            return
        state = {}
        for bucket in self.named_weights():
            if self.rank == 0:
                state.update((name, t.clone()) for name, t in bucket)
        if self.rank == 0:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)

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

