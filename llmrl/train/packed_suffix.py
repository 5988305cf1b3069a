"""The trainer's response pass without padding in its linear layers.

After the shared prompt pass (`llmrl.train.shared_prefix`), each row's response ("suffix") runs
through the decoder. Laid out as [rows, longest suffix], every row is padded to the longest one:
in a GRPO group of one-line replies, one 20-token reply pads fifteen of 12 tokens, and the
projections and MLP, nearly all of the pass's FLOPs, run on the padding too.

Here the suffixes run as one packed row [1, N] of their real tokens (N the sum of their lengths,
each at its own position), so the projections, MLP, norms and rotary embedding see no padding.
Only attention needs the row layout: inside `attending()` the llmrl_grouped attention hands each
layer's call to `PackedSuffix`, which scatters the packed queries, keys and values into
[rows, heads, longest suffix, dim], puts each row's prompt keys and values (from the prompt pass,
gradients attached) in front, attends with the causal mask the padded pass would have used, and
gathers the real tokens' outputs back. Attention is a small part of the work at these lengths, so
its padding stays.

Every token sees the same keys under the same mask as in the padded pass, so outputs and
gradients agree with it up to rounding: the matmuls run on differently shaped operands (tests).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_ACTIVE = threading.local()


def active_packed_suffix() -> PackedSuffix | None:
    """The packed suffix whose `attending()` block this thread is in, if any."""
    return getattr(_ACTIVE, "suffix", None)


class PackedSuffix:
    """Attention bookkeeping for one packed suffix pass.

    prefix_layers: per decoder layer, the distinct prompts' keys and values [U, Hkv, W, D];
    source [R]: each row's prompt among them; prefix_mask [U, W]: real prompt tokens;
    suffix_mask [R, S]: real suffix tokens, right-padded; packed_index [N]: the flat positions
    (row * S + column) of the real suffix tokens, in the order they are packed.
    """

    def __init__(
        self,
        prefix_layers: list[tuple[torch.Tensor, torch.Tensor]],
        source: torch.Tensor,
        prefix_mask: torch.Tensor,
        suffix_mask: torch.Tensor,
        packed_index: torch.Tensor,
    ) -> None:
        self.prefix_layers = prefix_layers
        self.source = source
        self.packed_index = packed_index
        self.rows, self.span = suffix_mask.shape
        self.mask = _row_mask(prefix_mask[source] > 0, suffix_mask > 0)
        self.calls = 0

    @contextlib.contextmanager
    def attending(self) -> Iterator[None]:
        outer = active_packed_suffix()
        _ACTIVE.suffix = self
        try:
            yield
        finally:
            _ACTIVE.suffix = outer

    def padded(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed query [1, H, N, D] and suffix key/value [1, Hkv, N, D] of decoder layer `layer`
        -> row-laid query [R, H, S, D], keys and values [R, Hkv, W + S, D] with each row's prompt
        in front, and the boolean mask [R, 1, S, W + S] (True = attend)."""
        self.calls += 1
        prefix_keys, prefix_values = self.prefix_layers[layer]
        keys = torch.cat([prefix_keys.index_select(0, self.source), self._rows(key)], dim=2)
        values = torch.cat([prefix_values.index_select(0, self.source), self._rows(value)], dim=2)
        return self._rows(query), keys, values, self.mask

    def packed(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [R, S, H, D] -> [1, N, H, D], the real tokens in packed order."""
        return out.reshape(self.rows * self.span, *out.shape[2:]).index_select(0, self.packed_index).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed per-token values [1, N, ...] -> [R, S, ...], zero at padding."""
        flat = packed[0]
        wide = flat.new_zeros(self.rows * self.span, *flat.shape[1:]).index_copy(0, self.packed_index, flat)
        return wide.view(self.rows, self.span, *flat.shape[1:])

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[1, h, N, D] -> [R, h, S, D], zero at padding (index_copy: its backward gathers)."""
        return self.unpack(t.transpose(1, 2)).transpose(1, 2)


def _row_mask(prefix_visible: torch.Tensor, suffix_real: torch.Tensor) -> torch.Tensor:
    """[R, 1, S, W + S]: query column q of a row sees its real prompt tokens and its own real
    suffix tokens up to q."""
    rows, span = suffix_real.shape
    causal = torch.ones(span, span, dtype=torch.bool).tril()
    own = causal[None] & suffix_real[:, None, :]
    prompt = prefix_visible[:, None, :].expand(rows, span, prefix_visible.shape[1])
    return torch.cat([prompt, own], dim=2).unsqueeze(1)
