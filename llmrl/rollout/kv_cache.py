"""A KV cache for the `hf` engine's decode that writes each token into room reserved up front.

transformers' DynamicLayer appends a token with torch.cat, which copies the layer's whole cache
every step: decoding T tokens copies O(T^2) cache entries per layer. Here each layer keeps its
keys and values in a buffer with room for the rest of the generation and a token costs one
slice write; attention reads a view of the filled part. Values are identical to DynamicLayer's.
When a sequence outlives the room, the buffer grows by doubling (a copy, as rarely as that).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's cache: `keys` and `values` are views of the first `length` slots of buffers
    that have room for `room` more tokens than the first update brought."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._make_room(end, key_states.shape[0], key_states.shape[1], key_states.shape[3])
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, self.length : end].copy_(key_states)
        self._value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def append_slot(self, rows: int, heads: int, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for one more token of every row, for a caller that writes it itself (llmrl's decode
        kernel, `rotary_attend_`): (key buffer, value buffer, the slot), the buffers contiguous
        [rows, heads, room, dim] of `like`'s dtype and device. The slot counts as filled from here on."""
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        slot = self.length
        self._make_room(slot + 1, rows, heads, dim)
        assert self._key_buffer is not None and self._value_buffer is not None
        self.length = slot + 1
        self._expose()
        return self._key_buffer, self._value_buffer, slot

    def _make_room(self, end: int, batch: int, heads: int, dim: int) -> None:
        """Buffers that hold `end` tokens: made with `room` to spare, or doubled when outgrown."""
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = end + self.room if self._key_buffer is None else max(end, 2 * self._key_buffer.shape[-2])
            self._key_buffer = self._resized(self._key_buffer, batch, heads, dim, capacity)
            self._value_buffer = self._resized(self._value_buffer, batch, heads, dim, capacity)

    def _resized(self, buffer: torch.Tensor | None, batch: int, heads: int, dim: int, capacity: int) -> torch.Tensor:
        grown = torch.empty(batch, heads, capacity, dim, dtype=self.dtype, device=self.device)
        if buffer is not None:
            grown[:, :, : self.length].copy_(buffer[:, :, : self.length])
        return grown

    def _expose(self) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length > 0:
            assert self._key_buffer is not None and self._value_buffer is not None
            self._key_buffer = self._selected(self._key_buffer, indices)
            self._value_buffer = self._selected(self._value_buffer, indices)
            self._expose()

    def _selected(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # Only the filled slots are copied, keeping the room: finished rows leave often.
        kept = torch.empty(len(indices), *buffer.shape[1:], dtype=buffer.dtype, device=buffer.device)
        kept[:, :, : self.length].copy_(buffer[indices, :, : self.length])
        return kept

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length > 0:
            assert self._key_buffer is not None and self._value_buffer is not None
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer does not crop; the hf engine never asks it to")


class PreallocatedCache(DynamicCache):
    """DynamicCache whose layers reserve `room` token slots beyond the prompt (the generation's
    max_new_tokens), created lazily per layer as DynamicCache's are."""

    def __init__(self, room: int) -> None:
        Cache.__init__(self, layer_class_to_replicate=lambda: PreallocatedLayer(room))

    def share(self, row_prompt: torch.Tensor, prompt_attention: torch.Tensor) -> None:
        """After the prefill of the distinct prompts: copy prompt `row_prompt[i]`'s cache to row i.
        (`prompt_attention` is for `SharedPrefixCache`, which shares instead of copying.)"""
        self.batch_select_indices(row_prompt)

    def decoding(self) -> contextlib.AbstractContextManager[None]:
        """Decode runs as it is: any attention implementation reads this cache."""
        return contextlib.nullcontext()
