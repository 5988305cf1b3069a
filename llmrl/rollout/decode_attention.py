"""Attention for the `hf` engine's decode steps: one new query per row over its KV cache.

transformers' SDPA path repeats every key and value head `groups` times before the kernel when
an attention mask is given (and the engine always gives one: rows are left-padded), so each
decode step of a grouped-query model copies the whole cache of every layer to 3x its size
(SmolLM2: 9 query heads over 3 KV heads). With a single query per row no copy is needed: view
the query heads as [kv_heads, groups] and let each KV head serve its group of queries as SDPA's
query positions. Prefill (several queries per row) keeps transformers' SDPA. Registered as the
attention implementation `llmrl_decode`; the masks are SDPA's, so both paths mask alike.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "llmrl_decode"


def grouped_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for one query per row, [B, H, 1, D] against [B, Hkv, L, D].

    Query head h reads KV head h // (H / Hkv), the layout transformers' repeat_kv produces. `mask`
    is SDPA's: boolean (True = attend) or additive, broadcastable to [B, 1, 1, L]. Returns
    [B, 1, H, D], the layout attention functions hand back.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # The group's query heads stand in for SDPA's query positions: every one of them attends to
    # the same keys under the same mask (no causal part), so this is exact, and the fused kernel
    # keeps its fp32 scores and softmax for bf16 inputs.
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim)


def decode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if query.shape[2] != 1 or dropout > 0 or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return grouped_decode_attention(query, key, value, attention_mask, scale), None


AttentionInterface.register(NAME, decode_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
