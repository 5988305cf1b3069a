"""Attention with its score matrix built in full: two batched matmuls and a softmax.

On a CPU, at the lengths RL fine-tuning trains on (a few hundred keys), the backward of torch's
fused flash kernel runs its small tiles far below the matmul peak: at the vs_trl shape (bf16,
16 rows x 3 KV heads x 387 grouped queries over 184 keys) it takes about twice as long as this
one, whose every product is one batched GEMM (docs/benchmarks.md).

The trainer turns it on around its forward passes (`materialized_scores`); the rollout engine's
prefill keeps the fused kernel. The forward keeps the probabilities for the backward, in fp32,
so memory grows with queries x keys; calls whose score matrix would exceed `MAX_SCORE_ELEMENTS`
go to the fused kernel. The two products whose rounding the softmax amplifies, the scores
(Q K^T) and the probabilities' gradient (dO V^T), run in fp32, as the fused kernel accumulates
them. On a CPU llmrl's kernels (`llmrl/kernels/softmax_products.cpp`) run the forward and the
backward whole with MKL's products, a tile of query rows at a time: each tile's scores are made,
turned into probabilities (or gradients) and multiplied again while they are in cache, and only
over the keys its rows see (a causal mask's upper triangle is never computed). That serves fp32
operands, and bf16 ones where the CPU multiplies bf16 natively (MKL's bf16 x bf16 -> fp32 GEMM, no
copies). Elsewhere torch's ops do it in passes over the whole score tensor, on fp32
copies of bf16 inputs (torch's CPU matmuls cannot write a bf16 product to an fp32 result).
Against fp64, outputs and gradients are as close as the fused kernel's (tests). The softmax runs
in fp32; fp64 stays fp64.

Backward (dO the output's gradient, P the probabilities, O = P V):
  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = scale dS K,  dK = scale dS^T Q
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch

from llmrl.workspace import workspace

# Scores per call above which the fused kernel is used: 2^24 is 64 MB of fp32 probabilities,
# kept per layer for the backward (about 2 GB for a 30-layer model at the bound).
MAX_SCORE_ELEMENTS = 1 << 24


_SWITCH = threading.local()


@contextlib.contextmanager
def materialized_scores() -> Iterator[None]:
    """Inside this block (the trainer's forward passes), grouped attention with several queries a
    head uses this module. Outside it (the rollout engine's prefill) the fused kernel stays: its
    rows come out bit-identical whatever else is in the batch and however far it is padded, which
    keeps seeded samples independent of how prompts are spread over engines. The matmul form's
    reductions run over the padded key length, so padding moves its last bits."""
    outer = getattr(_SWITCH, "on", False)
    _SWITCH.on = True
    try:
        yield
    finally:
        _SWITCH.on = outer


def serves(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether this module takes a call of query [B, h, Q, D] against key [B, h, K, D]: inside
    `materialized_scores`, with no gradient wanted for the mask, and small enough."""
    if not getattr(_SWITCH, "on", False) or (mask is not None and mask.requires_grad):
        return False
    batch, heads, queries, _ = query.shape
    return batch * heads * queries * key.shape[-2] <= MAX_SCORE_ELEMENTS


def materialized_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float, row_period: int = 0
) -> torch.Tensor:
    """softmax(query key^T * scale + mask) value for [B, h, Q, D] inputs; `mask` is SDPA's,
    boolean (True = attend) or additive, broadcastable to [B, h, Q, K]. A query that sees no
    key gets a zero output and zero gradients, as SDPA gives. Under autocast the inputs are cast
    to autocast's dtype, as SDPA's are; without it, to the widest of theirs. `row_period`: the
    queries come in runs of that many rows whose masks differ (the grouped layout's query heads,
    stacked), which llmrl's kernels keep apart when they tile the rows; 0 when there are none."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    # The casts above are autocast's for these inputs; inside, every product stays in `dtype`.
    with torch.autocast(device, enabled=False):
        return _Materialized.apply(query, key, value, mask, scale, row_period)


class _Materialized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, scale, row_period):  # type: ignore[override]
        ctx.scale, ctx.row_period = scale, row_period
        ctx.fused = _fused_softmax(query, key, value, mask)
        if ctx.fused:
            probs, out, spans = torch.ops.llmrl_kernels.attention_tiles_forward(query, key, value, _expanded(query, key, mask), scale, row_period)
            ctx.save_for_backward(query, key, value, probs, spans)
            return out
        probs = _probabilities(query, key, mask, scale)
        out = _bmm(_narrowed(probs, value.dtype, "low_probs"), value)
        ctx.save_for_backward(query, key, value, probs)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.fused:  # llmrl's kernels made the forward
            query, key, value, probs, spans = ctx.saved_tensors
            grads = torch.ops.llmrl_kernels.attention_tiles_backward(grad_out, query, key, value, probs, spans, ctx.scale, ctx.row_period)
            return (*grads, None, None, None)
        query, key, value, probs = ctx.saved_tensors
        grad_value = _bmm(_narrowed(probs, value.dtype, "low_probs").transpose(-1, -2), grad_out)
        # P * (dP - rowsum(P * dP)); the scale goes on dQ and dK, which are smaller.
        grad_probs = _bmm(grad_out.to(probs.dtype), value.to(probs.dtype).transpose(-1, -2), "scores")
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_scores = _narrowed(grad_scores, query.dtype, "low_scores")
        grad_query = _bmm(grad_scores, key).mul_(ctx.scale)
        grad_key = _bmm(grad_scores.transpose(-1, -2), query).mul_(ctx.scale)
        return grad_query, grad_key, grad_value, None, None, None


def _bmm(a: torch.Tensor, b: torch.Tensor, scratch: str | None = None) -> torch.Tensor:
    """a @ b over [B, h, m, k] x [B, h, k, n] as one 3-D bmm (torch.matmul on 4-D operands ran
    about 1.6x slower here at these shapes), into the workspace buffer `scratch` if named."""
    batch, heads, rows, cols = a.shape[0], a.shape[1], a.shape[2], b.shape[3]
    out = None if scratch is None else workspace().get(scratch, (batch * heads, rows, cols), torch.promote_types(a.dtype, b.dtype), a.device)
    flat = torch.bmm(a.reshape(batch * heads, rows, -1), b.reshape(batch * heads, -1, cols), out=out)
    return flat.view(batch, heads, rows, cols)


def _fused_softmax(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether llmrl's kernels take the softmax and its gradient whole (`softmax_products.cpp`):
    CPU operands of one dtype that `_softmax_products` serves, and a boolean mask or none."""
    dtype = query.dtype
    same = key.dtype == value.dtype == dtype
    return same and query.device.type == "cpu" and (mask is None or mask.dtype == torch.bool) and _softmax_products(dtype)


def _expanded(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean mask as llmrl's kernels read it: [B, H, M, N], broadcast by strides, keys contiguous."""
    if mask is None:
        return None
    mask = mask.expand(*query.shape[:3], key.shape[2])
    return mask if mask.stride(-1) == 1 else mask.contiguous()  # contiguous: a mask broadcast over the keys


@functools.cache
def _softmax_products(dtype: torch.dtype) -> bool:
    """Whether llmrl's kernels make the products for `dtype` here: fp32 wherever they build
    (cblas_sgemm), bf16 only on a CPU with native bf16 (elsewhere MKL would emulate it)."""
    from llmrl import kernels
    from llmrl.precision import cpu_has_native_bf16

    if dtype not in (torch.float32, torch.bfloat16) or (dtype == torch.bfloat16 and not cpu_has_native_bf16()):
        return False
    return kernels.load(kernels.DECODE) and bool(torch.ops.llmrl_kernels.softmax_products_available(dtype))


def _narrowed(t: torch.Tensor, dtype: torch.dtype, scratch: str) -> torch.Tensor:
    """`t` in `dtype`, through a workspace buffer when that is a cast: the copy dies with the call."""
    if t.dtype == dtype:
        return t
    return workspace().get(scratch, t.shape, dtype, t.device).copy_(t)


def _probabilities(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The softmax over keys, in fp32 or wider; rows with every key masked come out all zero.
    The scores live in the workspace; only the probabilities, kept for the backward, are new."""
    wide = torch.promote_types(query.dtype, torch.float32)
    scores = _bmm(query.to(wide) * scale, key.to(wide).transpose(-1, -2), "scores")
    if mask is None:
        return torch.softmax(scores, -1)
    if mask.dtype != torch.bool:
        return torch.softmax(scores.add_(mask), -1)
    probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), -1)
    blind = ~mask.any(-1, keepdim=True)  # queries that see no key: softmax gives NaN there
    return probs.masked_fill_(blind, 0.0) if bool(blind.any()) else probs
