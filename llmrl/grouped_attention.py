"""Grouped-query attention without copying key/value heads: the `llmrl_grouped` implementation.

transformers' SDPA path repeats every key and value head `groups` times before the kernel
whenever an attention mask is given, which is always in llmrl: rollout rows are left-padded, and
the trainer's rows are padded or share a prompt cache. For SmolLM2 (9 query heads over 3 KV
heads) that triples the keys and values of every layer, and in training the backward then sums
the gradients of the copies back.

Instead, view the query heads of each group as extra query positions of their KV head:
[B, H, Q, D] -> [B, Hkv, G*Q, D], with the mask's rows repeated once per group member. Every
query then sees exactly the keys and mask row it saw before, so the product is the same; the
fused kernel still keeps its fp32 scores and softmax for bf16 inputs. Measured on 2 CPU cores
(bf16, 16 rows x 128 queries over 230 keys, 30 layers): forward and backward 1.0-1.2 s instead
of 1.7 s (docs/benchmarks.md).

Inside the trainer's forward passes, calls with several queries a head run as batched matmuls
over a materialised score matrix (`llmrl.materialized_attention`) when that matrix is small
enough: there the fused kernel's backward is the slow part. Decode's single query and the
rollout engine's prefill keep the fused kernel. When the hf engine decodes over a cache that
keeps each prompt once for all its samples, every call goes to that cache's `attend`
(`llmrl.rollout.shared_prefix_cache`). When the trainer runs its rows' responses packed into
one row with their prompts, every call goes through `llmrl.train.packed_pass`, which lays them
out as rows again.

Calls this cannot serve exactly (no mask with several queries, which needs SDPA's causal flag;
dropout; position bias; a paged cache) go to transformers' SDPA. Masks are SDPA's.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llmrl.materialized_attention import materialized_attention, serves
from llmrl.models import GROUPED_ATTENTION as NAME
from llmrl.rollout.shared_prefix_cache import active_shared_prefix
from llmrl.train.packed_pass import active_packed_pass


def _grouped_mask(mask: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """SDPA's mask [b, h, Q, K] (h 1 or H, Q 1 or the query length) laid out for grouped queries."""
    if mask.shape[-2] == 1 and mask.shape[1] == 1:
        return mask  # one row for every query: it broadcasts over the grouped positions as before
    if mask.shape[1] == 1:
        return mask.repeat(1, 1, groups, 1)  # row g*Q + q is query q's row, for each member g
    batch, _, queries, keys = mask.shape
    return mask.expand(batch, kv_heads * groups, queries, keys).reshape(batch, kv_heads, groups * queries, keys)


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for query [B, H, Q, D] against key/value [B, Hkv, L, D].

    Query head h reads KV head h // (H / Hkv), the layout transformers' repeat_kv produces.
    `mask` is SDPA's, boolean (True = attend) or additive, broadcastable to [B, H, Q, L]; None
    means every query attends to every key (so not causal). Returns [B, Q, H, D], the layout
    attention functions hand back.
    """
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * queries, dim)
    if mask is not None:
        mask = _grouped_mask(mask, kv_heads, groups)
    # The trainer's passes (several queries a head) run as batched matmuls where the scores fit;
    # decode's single query reads the cache once through the fused kernel, which is faster there.
    if queries > 1 and serves(grouped, key, mask):
        out = materialized_attention(grouped, key, value, mask, scaling, row_period=queries if groups > 1 else 0)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous()


def grouped_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    shared = active_shared_prefix()
    if shared is not None:  # the hf engine's decode over a prompt cache shared by a group's samples
        return shared.attend(module.layer_idx, query, key, value, scale), None
    packed = active_packed_pass()
    if packed is not None:  # the trainer's shared-prompt pass, packed into one row (masks are its own)
        rows_query, keys, values, mask = packed.rows(query, key, value)
        return packed.packed(grouped_attention(rows_query, keys, values, mask, scale)), None
    # Several queries without a mask means "causal" to SDPA: only its own flag does that exactly.
    needs_sdpa = (attention_mask is None and query.shape[2] > 1) or dropout > 0 or query.shape[1] == key.shape[1]
    if needs_sdpa or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return grouped_attention(query, key, value, attention_mask, scale), None


AttentionInterface.register(NAME, grouped_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
