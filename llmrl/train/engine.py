"""The TrainEngine protocol and the train-section config shared by every backend."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator, Literal, Protocol

import torch
from pydantic import Field, model_validator

from llmrl.algorithms.base import Batch, LossContext, LossFn
from llmrl.config_base import Section
from llmrl.registry import registered_name
from llmrl.train.backends import TRAIN_BACKENDS


class TrainConfig(Section):
    backend: registered_name(TRAIN_BACKENDS) = Field(
        "torch", description="Train engine by registered name: torch (one process) or deepspeed (ZeRO)."
    )
    steps: int = Field(20, ge=1, description="Number of RL steps (rollout + update rounds).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts sampled per RL step; trajectories per step = prompts_per_step x rollout.n.")
    mini_batch_size: int | None = Field(
        None, ge=1, description="Trajectories per optimizer step; None = all trajectories of the step (one update per epoch)."
    )
    micro_batch_size: int | None = Field(
        8, ge=1, description="Trajectories per forward/backward pass (gradient accumulation splits a mini-batch into these)."
    )
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="If set, micro-batches are packed by padded-token budget instead of micro_batch_size."
    )
    lr: float = Field(1e-6, ge=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to lr.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of cosine/linear decay as a fraction of lr.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm to this; 0 disables clipping (the norm is still logged).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="fp32, or bf16 autocast over fp32 master weights. auto = bf16 where bf16 matmuls are native (CUDA, AVX512-BF16/AMX CPUs), else fp32.",
    )
    max_nonfinite_updates: int = Field(3, ge=1, description="Abort after this many consecutive updates with a non-finite loss or grad norm.")
    skip_zero_advantage_rows: bool = Field(
        True,
        description="Skip the forward/backward of rows whose advantages are all zero (e.g. GRPO groups where every "
        "sample scored the same) when the loss has no KL, entropy or entropy-control term: they add exactly zero "
        "gradient and still count in the normaliser, so the update is unchanged and faster. actor/* token metrics "
        "(entropy, clipfrac) then cover the trained rows; actor/rows_trained_frac says how many.",
    )
    logprob_diff_skipped_rows: bool = Field(
        False,
        description="Also measure rollout/logprob_diff on the rows skip_zero_advantage_rows leaves out. They run no "
        "forward in the update, so this costs a no-grad forward over them, about a third of what training them would "
        "(about a fifth of the quickstart's update time). Off: the metric covers the trained rows, at no cost, and is "
        "absent on a step that trains none.",
    )
    shared_prompt_forward: bool = Field(
        True,
        description="Run each distinct prompt of a micro-batch through the model once and share its key/value cache "
        "with the samples of that prompt (gradients included), instead of once per sample. Same update, less compute "
        "when prompts are long next to responses. Off for critics and under gradient checkpointing.",
    )
    packed_responses: bool = Field(
        True,
        description="With shared_prompt_forward, run a micro-batch's shared start, distinct prompts and responses as one "
        "packed row of their real tokens in one decoder call, so the projections and MLP skip all padding and the layers' "
        "per-call overhead is paid once; attention still sees rows. Same update up to rounding. Used with the "
        "llmrl_grouped attention (model.attn_implementation), the default; off runs prompts and padded responses as "
        "separate calls.",
    )
    fused_layers: bool = Field(
        True,
        description="On a CPU, train the RMSNorms and SiLU-gated MLPs of Llama-family models (transformers' Llama, Qwen2, "
        "Qwen3 and Mistral classes) through llmrl's fused kernels, one pass forward and one backward each, instead of "
        "transformers' many small ops: a SmolLM2-135M GRPO update of 32 rows (4 prompts x 8, 128 new tokens) took 21.99 "
        "against 22.61 s on 2 cores. Same forward rounding; gradients equal up to fp32 rounding, which moves metrics "
        "at about 1e-6. Where the kernels do not build, transformers' modules run.",
    )
    logprob_chunk_tokens: int = Field(1024, ge=16, description="Tokens per chunk when computing logprobs/entropy. It bounds the logits' memory: the pass keeps "
                                      "scratch buffers of about 2.5 x this x vocabulary fp32 values between steps (560 MB for SmolLM2).")
    logprob_keep_logits_mb: int = Field(
        1024, ge=0,
        description="Logits (fp32, tokens x vocabulary) of a micro-batch that its forward keeps for its backward, in MB; the "
        "backward recomputes the rest, one lm_head product per chunk. The buffer is kept between steps. 0 recomputes all "
        "(the least memory); at SmolLM2's vocabulary 1024 MB keeps about 5,400 tokens.",
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2,
        description="deepspeed backend: ZeRO stage. 1 shards optimizer state over the data-parallel ranks, 2 also "
        "gradients, 3 also the weights (gathered per module as they are used; not with model.lora).",
    )
    offload_optimizer: bool = Field(False, description="deepspeed backend: keep optimizer state on the CPU (ZeRO-Offload).")

    @model_validator(mode="after")
    def _one_micro_unit(self) -> "TrainConfig":
        if self.micro_batch_tokens is None and self.micro_batch_size is None:
            raise ValueError("set train.micro_batch_size or train.micro_batch_tokens")
        return self


class NonFiniteUpdateError(RuntimeError):
    pass


class TrainEngine(Protocol):
    """What owns a model and its optimizer: the policy's engine, the PPO critic's, and (with Ray)
    a proxy driving a group of data-parallel ranks all implement this."""

    def forward(
        self, batch: Batch, want: set[str], reference: bool = False, micro_batch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """No-grad outputs (logprobs, entropy, values) for every row, token-aligned."""

    def step(self, mini_batch: Batch, loss_fn: LossFn, ctx: LossContext) -> dict[str, float]:
        """One optimizer step over a mini-batch; the engine splits it into micro-batches (and,
        data-parallel, into its ranks' shares) with mini-batch-global loss normalisation."""

    def named_weights(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (merged) weights in size-bounded buckets, for weight sync and export. A bucket's
        tensors may be views that change or vanish once the next bucket is asked for (ZeRO-3
        releases each gathered bucket): copy what you keep. A tensor shared under two names (a
        tied lm_head) comes once, under its first name."""

    def save_policy(self, directory: Path) -> None:
        """The trained model as an HF directory (the checkpoint's `policy/`)."""

    def save(self, directory: Path) -> None:
        """Everything needed to resume exactly: weights, optimizer, scheduler, counters."""

    def load(self, directory: Path) -> None: ...


def each_tensor_once(entries: Iterable[tuple[str, torch.Tensor]], key: Callable[[torch.Tensor], Hashable]) -> Iterator[tuple[str, torch.Tensor]]:
    """`entries` with each tensor once, under the first name it has. A state dict lists a tied
    lm_head beside the input embedding it shares; engines re-tie it from the embedding, so sending
    it too would ship the largest tensor twice (SmolLM2-135M: 108 MiB of 621 a sync)."""
    seen: set[Hashable] = set()
    for name, tensor in entries:
        k = key(tensor)
        if k not in seen:
            seen.add(k)
            yield name, tensor


def storage_key(tensor: torch.Tensor) -> Hashable:
    """Equal for tensors that are the same memory seen the same way (detached aliases included)."""
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else id(tensor)
