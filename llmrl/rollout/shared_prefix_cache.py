"""Decode over one copy of each prompt's cache, shared by all the samples of that prompt.

GRPO draws n completions of every prompt. With a cache of its own per row, every decode step
reads the prompt's keys and values n times in every layer; on a CPU that read is most of what
decode attention costs. This cache keeps each prompt's keys and values once (the prefix) and
each row's generated tokens apart (its suffix), and splits attention over the two:

    with (O_p, L_p) the output and log-sum-exp of a query over the prefix and (O_s, L_s) over
    the suffix, attention over both is  O = w O_p + (1 - w) O_s,  w = sigmoid(L_p - L_s),

which is exact: it is softmax over the concatenated keys, regrouped. All rows of a prompt,
times the query heads that share a KV head, attend the prefix as one call, so its keys are read
once per prompt (Juravsky et al., "Hydragen: High-Throughput LLM Inference with Shared
Prefixes", 2024). The suffix has no padding (finished rows leave the batch), so its call needs
no mask.

The model must use the llmrl_grouped attention: inside `decoding()` it hands every call to
`attend`. The last bits differ from attention over the concatenated cache, since the two
partial outputs are rounded to the model's dtype before they are merged in fp32.

On a CPU, `kernel=True` runs each layer's call as one pass of llmrl's own kernel
(`llmrl/kernels/shared_prefix_decode.cpp`) instead: each row's queries over its prompt's keys
(read through `row_prompt`, padding skipped) and then its own, with one fp32 softmax over both,
so nothing is rounded before the merge. torch's fused kernel spent most of its time setting up
tiles for the 3 queries each (row, KV head) pair has in decode (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from llmrl import kernels
from llmrl.rollout.kv_cache import PreallocatedLayer

KERNEL = kernels.DECODE
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_ACTIVE = threading.local()


def active_shared_prefix() -> SharedPrefixCache | None:
    """The cache whose `decoding()` block this thread is in, if any."""
    return getattr(_ACTIVE, "cache", None)


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU attention, which also returns each query's log-sum-exp (fp32)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


class SharedPrefixLayer(DynamicLayer):
    """One layer: the prompts' keys and values [P, Hkv, W, D] as the prefill made them, and the
    rows' generated ones in a `PreallocatedLayer`."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None
        self.suffix = PreallocatedLayer(room)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefix_keys is None:  # the prefill: the distinct prompts, attended as usual
            self.lazy_initialization(key_states, value_states)
            self.prefix_keys, self.prefix_values = key_states, value_states
            return key_states, value_states
        if active_shared_prefix() is None:
            raise RuntimeError("a shared-prefix cache decodes only inside its decoding() block, with llmrl_grouped attention")
        return self.suffix.update(key_states, value_states)

    def get_seq_length(self) -> int:
        prefix = 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]
        return prefix + self.suffix.length

    def keep_prompts(self, prompts: torch.Tensor) -> None:
        assert self.prefix_keys is not None and self.prefix_values is not None
        self.prefix_keys, self.prefix_values = self.prefix_keys[prompts], self.prefix_values[prompts]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.suffix.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SharedPrefixLayer does not crop; the hf engine never asks it to")


class SharedPrefixCache(DynamicCache):
    """Prefill the distinct prompts into it, then `share` them out to the rows that sample them
    and decode inside `decoding()`. Rows leave with `batch_select_indices`, as with any cache; a
    prompt whose rows have all left is dropped."""

    def __init__(self, room: int, kernel: bool = False) -> None:
        Cache.__init__(self, layer_class_to_replicate=lambda: SharedPrefixLayer(room))
        self.prefix_mask: torch.Tensor | None = None
        self.prefix_valid: torch.Tensor | None = None  # [P, W] bool, for the kernel; None = no padding
        self.kernel = kernel and kernels.load(KERNEL)

    def share(self, row_prompt: torch.Tensor, prompt_attention: torch.Tensor) -> None:
        """Row i samples prompt `row_prompt[i]`; `prompt_attention` [P, W] is the prefill's
        padding mask (1 = token)."""
        layer = self.layers[0]
        # decided once, here, where the prefill has shown the cache's dtype and device
        self.kernel = self.kernel and layer.device.type == "cpu" and layer.dtype in KERNEL_DTYPES
        if bool(prompt_attention.all()):
            self.prefix_mask = self.prefix_valid = None  # no padding: neither path needs a mask
        elif self.kernel:  # the kernel skips padding slots by a boolean row per prompt
            self.prefix_valid = (prompt_attention != 0).contiguous()
        else:  # torch's kernel adds -inf at them
            blocked = torch.zeros(prompt_attention.shape, dtype=layer.dtype, device=layer.device)
            self.prefix_mask = blocked.masked_fill_(prompt_attention == 0, float("-inf"))[:, None, None, :]
        self._assign(row_prompt)

    def _assign(self, row_prompt: torch.Tensor) -> None:
        # Slot p * R + r holds the r-th live row of prompt p, R being the most rows any prompt has:
        # the prefix call then sees every prompt's queries side by side.
        self.row_prompt = row_prompt
        self.prompts = int(row_prompt.max()) + 1
        if self.kernel:
            return  # the kernel reads each row's prompt through row_prompt; the slots are torch's path's
        counts = torch.bincount(row_prompt, minlength=self.prompts)
        self.rows_per_prompt = int(counts.max())
        order = torch.argsort(row_prompt, stable=True)
        first_of_prompt = counts.cumsum(0) - counts
        rank = torch.empty_like(row_prompt)
        rank[order] = torch.arange(len(row_prompt)) - first_of_prompt[row_prompt[order]]
        self.slot = row_prompt * self.rows_per_prompt + rank
        # every slot filled by the row of the same index: no scatter or gather needed
        rows = len(row_prompt)
        self.in_slot_order = rows == self.prompts * self.rows_per_prompt and bool(torch.equal(self.slot, torch.arange(rows)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        row_prompt = self.row_prompt[indices]
        live = torch.unique(row_prompt)
        if len(live) < self.prompts:
            for layer in self.layers:
                layer.keep_prompts(live)
            if self.prefix_mask is not None:
                self.prefix_mask = self.prefix_mask[live]
            if self.prefix_valid is not None:
                self.prefix_valid = self.prefix_valid[live]
            row_prompt = torch.searchsorted(live, row_prompt)
        self._assign(row_prompt)
        for layer in self.layers:
            layer.batch_select_indices(indices)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        outer = active_shared_prefix()
        _ACTIVE.cache = self
        try:
            yield
        finally:
            _ACTIVE.cache = outer

    def rotary_attend(
        self, layer_idx: int, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One decode step's attention from the packed product qkv [rows, (heads + 2 kv_heads) * D]:
        q and k rotated in place, the new keys and values appended, attention over the prompt and
        the row's tokens; returns [rows, heads * D]. One call of the kernel (`self.kernel` only):
        the same values as rotary_, `update` and `attend` in turn."""
        if not self.kernel:
            raise RuntimeError("rotary_attend runs llmrl's decode kernel, which this cache does not use")
        layer = self.layers[layer_idx]
        dim = cos.shape[-1]
        key_buffer, value_buffer, slot = layer.suffix.append_slot(len(qkv), kv_heads, dim, qkv)
        return torch.ops.llmrl_kernels.rotary_attend_(
            qkv, heads, kv_heads, cos, sin, key_buffer, value_buffer, slot, layer.prefix_keys, layer.prefix_values,
            self.prefix_valid, self.row_prompt, scale,
        )

    def attend(self, layer_idx: int, query: torch.Tensor, suffix_keys: torch.Tensor, suffix_values: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one new token per row, query [B, H, 1, D], over its prompt and its own
        tokens so far; returns [B, 1, H, D] as attention functions do. Query head h reads KV head
        h // (H / Hkv)."""
        layer = self.layers[layer_idx]
        batch, heads, queries, dim = query.shape
        if queries != 1:
            raise ValueError(f"shared-prefix decode takes one query per row, got {queries}")
        kv_heads = suffix_keys.shape[1]
        groups = heads // kv_heads
        grouped = query.reshape(batch, kv_heads, groups, dim)
        if self.kernel:
            out = torch.ops.llmrl_kernels.shared_prefix_decode(
                grouped, layer.prefix_keys, layer.prefix_values, self.prefix_valid, self.row_prompt, suffix_keys, suffix_values, scale
            )
            return out.view(batch, 1, heads, dim)  # [B, Hkv, G, D] is [B, H, D]: row-major, the layout asked for
        prompts, per_prompt = self.prompts, self.rows_per_prompt
        slots = grouped if self.in_slot_order else grouped.new_zeros(prompts * per_prompt, kv_heads, groups, dim).index_copy_(0, self.slot, grouped)
        prefix_query = slots.view(prompts, per_prompt, kv_heads, groups, dim).transpose(1, 2).reshape(prompts, kv_heads, per_prompt * groups, dim)
        prefix_out, prefix_lse = _flash(prefix_query, layer.prefix_keys, layer.prefix_values, self.prefix_mask, scale)
        prefix_out = prefix_out.reshape(prompts, kv_heads, per_prompt, groups, dim).transpose(1, 2).reshape(-1, kv_heads, groups, dim)
        prefix_lse = prefix_lse.reshape(prompts, kv_heads, per_prompt, groups).transpose(1, 2).reshape(-1, kv_heads, groups)
        if not self.in_slot_order:
            prefix_out, prefix_lse = prefix_out[self.slot], prefix_lse[self.slot]
        suffix_out, suffix_lse = _flash(grouped, suffix_keys, suffix_values, None, scale)
        merge_dtype = torch.promote_types(query.dtype, torch.float32)  # fp32 for bf16, fp64 stays fp64
        prefix_weight = torch.sigmoid(prefix_lse - suffix_lse).unsqueeze(-1).to(merge_dtype)
        merged = torch.lerp(suffix_out.to(merge_dtype), prefix_out.to(merge_dtype), prefix_weight).to(query.dtype)
        return merged.reshape(batch, heads, 1, dim).transpose(1, 2)
