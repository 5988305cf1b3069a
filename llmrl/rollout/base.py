"""The RolloutEngine protocol and its registry.

Logprobs mean one thing everywhere: log-softmax of logits / temperature (temperature 0, i.e.
greedy, reports the temperature-1 distribution). Prompts go in as token ids so multi-turn and
guided workflows can extend a sequence without re-tokenising it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol

import torch
from pydantic import ConfigDict, Field, model_validator

from llmrl.config_base import Section
from llmrl.distributed.weight_sync import WEIGHT_SYNCS
from llmrl.registry import Registry, registered_name
from llmrl.types import Completion


def check_workflow_options(name: str, options: dict[str, Any]) -> None:
    """A ValueError naming each bad option of workflow `name` (unknown key, wrong type)."""
    from pydantic import ValidationError

    options_cls = WORKFLOWS[name].Options
    try:
        options_cls.model_validate(options)
    except ValidationError as err:
        known = ", ".join(options_cls.model_fields) or "none"
        problems = "; ".join(
            f"unknown option '{'.'.join(map(str, e['loc']))}'" if e["type"] == "extra_forbidden"
            else f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"workflow '{name}': {problems} (its options: {known})") from None


def _import_builtin_engines() -> None:
    importlib.import_module("llmrl.rollout.hf")
    importlib.import_module("llmrl.rollout.vllm_engine")  # registers "vllm"; imports vLLM only when built


ROLLOUT_ENGINES: Registry[Callable[..., "RolloutEngine"]] = Registry("rollout engine", loader=_import_builtin_engines)
WORKFLOWS: Registry[Any] = Registry(
    "workflow", loader=lambda: [importlib.import_module(m) for m in ("llmrl.rollout.workflows", "llmrl.rollout.guided", "llmrl.rollout.multi_turn")]
)


class WorkflowConfig(Section):
    """The recipe's `rollout.workflow`: a workflow name plus that workflow's own options."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str | None = Field(None, description="Workflow by registered name (single_turn, ...); None = the algorithm preset's.")

    @model_validator(mode="after")
    def _options_match_the_workflow(self) -> "WorkflowConfig":
        if self.name is not None:
            check_workflow_options(self.name, self.options())
        return self

    def options(self) -> dict[str, Any]:
        """The workflow's own keys (everything but `name`)."""
        return dict(self.model_extra or {})


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # One seed per prompt: row i is drawn from its own generator, so its sample does not depend on
    # which rows share the batch (evaluation resumed half-way draws what an uninterrupted run drew).
    # Engines that cannot seed a request (vllm, see vllm_engine.py) use `seed` alone.
    row_seeds: list[int] | None = None
    # Decode past EOS so every row runs max_new_tokens (stop strings still apply): fixed work,
    # for comparing engines' throughput without their samples' lengths in the way.
    ignore_eos: bool = False
    # The completions are a training rollout (the loop's own sampling): an engine may keep what
    # the trainer would recompute from them (the hf engine's decode outputs, decode_outputs.py).
    for_training: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RolloutConfig(Section):
    engine: registered_name(ROLLOUT_ENGINES) = Field("hf", description="Rollout engine by registered name: hf (transformers, embedded default) or vllm.")
    workflow: WorkflowConfig = Field(
        default_factory=WorkflowConfig,
        description="How tasks become trajectories: `name` (single_turn, ...; default: the algorithm preset's) plus that workflow's options.",
    )
    weight_sync: registered_name(WEIGHT_SYNCS) = Field(
        "inprocess",
        description="How trained weights reach the rollout engine after each update, by registered name: inprocess "
        "(same process), or broadcast (cluster.backend: ray; a gloo/NCCL group from train rank 0 to every engine).",
    )
    check_sync: bool = Field(
        False,
        description="After every sync, score a fixed 32-token probe on the engines (old and new weights) and on the "
        "trainer, and log the mean |logprob gap| as sync/check_gap_before and sync/check_gap_after: proof the engines "
        "serve the trained weights. One trainer forward and two engine scores per sync.",
    )
    sync_bucket_mb: int = Field(
        256, ge=1,
        description="Weights per sync bucket, MiB. A sync holds about one bucket at a time on each side (two on a ZeRO-3 "
        "rank 0, which gathers a bucket and copies it); smaller buckets, less peak memory, more round trips.",
    )
    n: int = Field(8, ge=1, description="Samples per prompt (the GRPO group size).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy. Logprobs are of logits / temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; RL keeps 1.0 so rollout and trainer distributions match.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 is off.")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per sample, in tokens.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS always stops).")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype of the rollout copy of the model; auto = bfloat16 only where bf16 matmuls are native."
    )
    max_batch_size: int = Field(64, ge=1, description="hf engine: sequences generated together in one batch.")
    packed_linears: bool | Literal["auto"] = Field(
        "auto",
        description="hf engine: run q/k/v and gate/up as one matmul each, with weights pre-packed on a CPU "
        "(llmrl/rollout/packed_linears.py): fp32 weights as panels for llmrl's own product on AVX2 CPUs without AVX-512 "
        "(llmrl/kernels/panel_gemm.cpp), bf16 weights as panels for llmrl's bf16 product on CPUs with AVX512-BF16 "
        "and without AMX (llmrl/kernels/panel_gemm_bf16.cpp), else in MKL's packed form (fp32) where MKL runs its "
        "Intel kernels (an Intel CPU, or an AMD one under llmrl's preload), else for oneDNN. auto = on a CPU with at most 4 torch threads, for bf16 "
        "weights, and for fp32 weights on AMD CPUs; that is where it was faster, and with more threads it was slower. "
        "true = always; false = transformers' separate linears.",
    )
    decode_kernel: bool | Literal["auto"] = Field(
        "auto",
        description="hf engine on a CPU: decode attention over a group's shared prompt cache with llmrl's own kernel "
        "(llmrl/kernels/shared_prefix_decode.cpp), and plain sampling (no top-k/top-p) with its sampler kernel "
        "(llmrl/kernels/sampling.cpp), built with the system C++ compiler on first use and cached in "
        "$LLMRL_KERNEL_CACHE (default ~/.cache/llmrl/kernels). auto = use them where they build, else torch's "
        "attention and sampling, with a warning; true = fail if they cannot be built; false = torch's.",
    )
    fused_decode: bool | Literal["auto"] = Field(
        "auto",
        description="hf engine on a CPU: decode steps of Llama-family models (model_type llama or qwen2) run llmrl's own "
        "layer loop (llmrl/rollout/fused_decode.py) with fused RMSNorm, rotary and SiLU kernels, instead of transformers' "
        "modules; same logits up to fp32 summation order. Needs the kernels of decode_kernel and grouped linears "
        "(packed_linears not false). auto = where it can run, else transformers' forward; true = fail, naming why, "
        "where it cannot; false = transformers' forward.",
    )
    reuse_decode_outputs_mb: int = Field(
        4096, ge=0,
        description="hf engine with the fused decode step and a fp32 torch trainer in the same process (cluster.backend: "
        "none, no LoRA): keep each training rollout's decoder linear outputs and head logits, up to this many MiB, and let "
        "the update's forward take them instead of multiplying again while the trainer's weights are still the rollout's "
        "(its first optimizer step of the step); rows whose tokens were not all decoded (tool output) are recomputed "
        "(llmrl/rollout/decode_outputs.py). Costs 4 bytes x (the layers' summed output widths x layers + the vocabulary) "
        "per generated token (SmolLM2-135M: 0.82 MB a token); a rollout that does not fit keeps no logits and its first "
        "layers that do. actor/reused_decode_frac logs the share of the update's layer products it saved. 0 = off.",
    )
    # vLLM engine (rollout.engine: vllm)
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one engine shards the model over.")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1,
        description="vllm: fraction of accelerator memory for weights and KV cache (on the CPU build: of the NUMA node's memory, "
        "unless VLLM_CPU_KVCACHE_SPACE is set). vLLM's 0.92 default fails to start on small CPU machines.",
    )
    max_num_seqs: int = Field(64, ge=1, description="vllm: sequences scheduled together.")
    max_model_len: int | None = Field(None, ge=16, description="vllm: longest prompt + completion in tokens; None = the model's limit.")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs (faster start, slower decode on GPU; no effect on CPU).")
    vllm_cpu_kvcache_gib: int = Field(
        2, ge=1, description="vllm-cpu: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless already set in the environment)."
    )


class RolloutEngine(Protocol):
    """What generates. Weight updates are bracketed: `begin_weight_update()`, one `load_weights`
    per bucket, then `finish_weight_update()`, which must leave the new weights in effect (an
    engine may stage the buckets and apply them all there)."""

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """One completion per prompt (repeat a prompt n times for a group)."""

    def score(self, prefix_ids: list[list[int]], continuation_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced logprob of every continuation token given its prefix."""

    def metrics(self) -> dict[str, float]:
        """Figures for the step's metric row (e.g. rollout/restarts); {} when there are none."""

    def begin_weight_update(self) -> None: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One bucket of the trainer's weights (full names, merged LoRA)."""

    def finish_weight_update(self) -> None: ...


def register_rollout_engine(
    name: str, requirement: Callable[[], str | None] | None = None
) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    """Decorator for an engine factory `(rollout_cfg, model_cfg, tokenizer, seed=0) -> engine`;
    `requirement` says why it cannot run in this install (None when it can)."""

    def register(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        return ROLLOUT_ENGINES.register(name, factory, requirement=requirement)

    return register


def engine_unavailable(name: str) -> str | None:
    """Why rollout engine `name` cannot be built here, in one line; None when it can."""
    return ROLLOUT_ENGINES.unavailable(name)


def build_rollout_engine(cfg: RolloutConfig, model_cfg: Any, tokenizer: Any, seed: int = 0) -> RolloutEngine:
    """`seed` seeds engines that sample from one engine-wide generator (vllm); hf seeds each request."""
    reason = engine_unavailable(cfg.engine)
    if reason:
        raise ValueError(f"rollout.engine: '{cfg.engine}': {reason}")
    return ROLLOUT_ENGINES[cfg.engine](cfg, model_cfg, tokenizer, seed=seed)
