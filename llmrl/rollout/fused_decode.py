"""llmrl's own decode step for Llama-family models, used by the hf engine on a CPU.

A decode step pushes one token per row through every layer. transformers' module stack does
that in many small operators and Python calls: a profile of a bf16 step of 32 rows of
SmolLM2-135M (63 ms) spent about 12 ms in small ops (RMSNorm alone is seven, rotary eight) and
11 ms outside any op, against 25 ms in the linears (docs/benchmarks.md). Here a layer is one
flat sequence of nine calls:

    h = add_rms_norm(x, delta)        the residual add and the norm in one pass
    qkv = [q|k|v](h)                  one packed product (llmrl/rollout/packed_linears.py)
    rotary_(qkv)                      q and k rotated in place
    attention                         the shared-prefix cache's decode kernel
    o = o_proj(attention)
    h = add_rms_norm(x, o)
    gate_up = [gate|up](h)            one packed product
    m = silu_mul(gate_up)
    delta = down_proj(m)

and the head's product is packed too (transformers' lm_head is a plain linear).
The elementwise ops are `llmrl/kernels/decode_ops.cpp` and round where transformers' modules
round, so a step gives transformers' logits up to the order of fp32 sums (see the tests).
The prefill, and any step this cannot take, runs transformers' forward as before.

Which architectures qualify is a registry keyed by `config.model_type`; an entry returns why a
model does not fit (None when it does), checked once when the engine starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llmrl import kernels
from llmrl.registry import Registry
from llmrl.rollout.decode_outputs import DecodeRecord
from llmrl.rollout.packed_linears import GroupedLinear, LinearGroup, PackedWeight
from llmrl.rollout.shared_prefix_cache import SharedPrefixCache

DTYPES = (torch.float32, torch.bfloat16)

# model_type -> a check that returns why a model of that type cannot take the fused step
FUSED_DECODE_MODELS: Registry[Callable[[nn.Module], "str | None"]] = Registry("fused-decode model type")


def _llama_layout_problem(model: nn.Module) -> str | None:
    """What transformers' Llama-style decoders share: pre-norm layers of RMSNorm, rotary
    attention with q/k/v/o projections, and a SiLU-gated MLP."""
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act is {getattr(config, 'hidden_act', None)!r}, not 'silu'"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model lacks model.embed_tokens/layers/norm/rotary_emb"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm")):
            return "its attention normalises q and k"
        if not isinstance(attn.q_proj, GroupedLinear) or attn.q_proj.group.sizes != [
            attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features
        ]:
            return "q/k/v are not one linear group"
        if not isinstance(mlp.gate_proj, GroupedLinear) or len(mlp.gate_proj.group.sizes) != 2:
            return "gate/up are not one linear group"
        if not isinstance(attn.o_proj, GroupedLinear) or not isinstance(mlp.down_proj, GroupedLinear):
            return "o_proj/down_proj are not packed"
    return None


def _qwen2_problem(model: nn.Module) -> str | None:
    if getattr(model.config, "use_sliding_window", False):
        return "it uses sliding-window attention"
    return _llama_layout_problem(model)


FUSED_DECODE_MODELS.register("llama", _llama_layout_problem)
FUSED_DECODE_MODELS.register("qwen2", _qwen2_problem)  # Llama's layout with biases on q/k/v


def fused_decode_problem(model: nn.Module) -> str | None:
    """Why `FusedDecode(model)` cannot serve this model here; None when it can."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FUSED_DECODE_MODELS:
        return f"model type {model_type!r} has none (registered: {', '.join(sorted(FUSED_DECODE_MODELS))})"
    weights = next(model.parameters())
    if weights.device.type != "cpu" or weights.dtype not in DTYPES:
        return f"weights are {weights.dtype} on {weights.device.type}; it runs float32 or bfloat16 on a CPU"
    if not kernels.load(kernels.DECODE):
        return f"llmrl's decode kernels do not build here: {kernels.failure(kernels.DECODE)}"
    return FUSED_DECODE_MODELS[model_type](model)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: LinearGroup
    o: LinearGroup
    gate_up: LinearGroup
    down: LinearGroup


class FusedDecode:
    """One decode step of a qualifying model (see `fused_decode_problem`) over a
    `SharedPrefixCache` that holds its prefill: `step(cache, tokens, positions)` -> logits."""

    def __init__(self, model: nn.Module) -> None:
        problem = fused_decode_problem(model)
        if problem is not None:
            raise ValueError(f"no fused decode for this model: {problem}")
        inner = model.model
        first = inner.layers[0]
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        # The head packed as the layers' linears are: at 64 rows it was 1.4x (bf16) and 1.9x (fp32)
        # faster than torch's product on 2 AMD cores (docs/benchmarks.md).
        grouped = first.self_attn.q_proj.group
        self.head = PackedWeight(model.lm_head.weight, model.lm_head.bias, grouped.pack, grouped.rows_hint)
        self.final_norm = inner.norm.weight
        self.eps = float(first.input_layernorm.variance_epsilon)
        self.head_dim = int(first.self_attn.head_dim)
        self.heads = first.self_attn.q_proj.out_features // self.head_dim
        self.kv_heads = first.self_attn.k_proj.out_features // self.head_dim
        self.scale = float(first.self_attn.scaling)
        # Parameters are read through the modules' own tensors, so a weight sync that writes
        # them in place (load_weights) is seen; the groups re-pack when a weight moved.
        self.layers = [
            _Layer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.self_attn.q_proj.group,
                layer.self_attn.o_proj.group, layer.mlp.gate_proj.group, layer.mlp.down_proj.group,
            )
            for layer in inner.layers
        ]

    def layer_products(self) -> list[list[tuple[str, int]]]:
        """A layer's four products in the order `step` computes them, each as the linears it
        packs (their paths inside a decoder layer) with their output widths."""
        names = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
        first = self.layers[0]
        groups = (first.qkv, first.o, first.gate_up, first.down)
        return [list(zip(paths, group.sizes)) for paths, group in zip(names, groups)]

    @torch.no_grad()
    def step(
        self, cache: SharedPrefixCache, tokens: torch.Tensor, positions: torch.Tensor, keep: DecodeRecord | None = None
    ) -> torch.Tensor:
        """Logits [rows, vocab] for one new token per row (`tokens` [rows], at `positions` [rows]),
        appending their keys and values to `cache`. `keep` takes each layer's products (numbered
        as in `layer_products`) before anything changes them in place, and the logits."""
        ops = torch.ops.llmrl_kernels
        rows, dim = len(tokens), self.head_dim
        q_width, kv_width = self.heads * dim, self.kv_heads * dim
        x = self.embed(tokens)  # the residual stream, updated in place
        cos, sin = self.rotary(x, positions[:, None])
        cos, sin = cos[:, 0], sin[:, 0]
        # With the decode kernel, a layer's rotary, cache write and attention are one call
        # (SharedPrefixCache.rotary_attend): the same values, and 20.7 instead of 87.6 us a layer of
        # per-call cost at 32 rows. The rotary's cos and sin must then have contiguous rows.
        one_call = cache.kernel
        if one_call:
            cos, sin = cos.contiguous(), sin.contiguous()
        delta: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.input_norm, self.eps) if delta is None else ops.add_rms_norm(x, delta, layer.input_norm, self.eps)
            qkv = layer.qkv.product(h)
            if keep is not None:
                keep.keep(index, 0, qkv)  # before the rotary turns q and k in place
            if one_call:
                attended = cache.rotary_attend(index, qkv, self.heads, self.kv_heads, cos, sin, self.scale)
            else:
                ops.rotary_(qkv, self.heads + self.kv_heads, cos, sin)
                query = qkv[:, :q_width].view(rows, self.heads, 1, dim)
                keys = qkv[:, q_width : q_width + kv_width].view(rows, self.kv_heads, 1, dim)
                values = qkv[:, q_width + kv_width :].view(rows, self.kv_heads, 1, dim)
                all_keys, all_values = cache.layers[index].suffix.update(keys, values)
                attended = cache.attend(index, query, all_keys, all_values, self.scale).reshape(rows, q_width)
            o = layer.o.product(attended)
            h = ops.add_rms_norm(x, o, layer.post_attention_norm, self.eps)
            gate_up = layer.gate_up.product(h)
            delta = layer.down.product(ops.silu_mul(gate_up))
            if keep is not None:
                keep.keep(index, 1, o)
                keep.keep(index, 2, gate_up)
                keep.keep(index, 3, delta)
        assert delta is not None
        logits = self.head.product(ops.add_rms_norm(x, delta, self.final_norm, self.eps))
        if keep is not None:
            keep.keep_logits(logits)
        return logits
