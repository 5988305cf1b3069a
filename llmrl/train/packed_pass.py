"""The trainer's shared-prompt forward as one packed row: shared start, prompts and responses.

`llmrl.train.shared_prefix` runs each distinct prompt of a micro-batch once and lets the rows
that share it attend to its keys and values. Run as separate decoder calls (the shared start,
then the prompts, then the responses, each over its own cache), every call pays the model's
per-layer operator overhead forward and backward: on 2 CPU cores the 24-token chat header of
SmolLM2's prompts cost 0.3 s a micro-batch that way, for 24 tokens of compute
(docs/benchmarks.md). Here all of them run as one row of their real tokens, [1, N], each at its
own position, so the projections, MLP, norms and rotary embedding run once, on no padding.

Only attention needs rows. Inside `attending()` the llmrl_grouped attention hands each layer's
call to `PackedPass`, which scatters the packed queries, keys and values into a grid of rows,
each right-padded to the widest:
  the root (the start every distinct prompt shares; no row when empty),
  each distinct prompt's own tokens after the root,
  each trained row's suffix (its last prompt token and its response).
A row's keys are [root | its prompt | its own row]: the root sees itself causally; a prompt sees
the whole root and itself causally; a suffix sees the root, its prompt's real tokens and itself
causally. That is the mask the per-row forward uses, so outputs and gradients agree with it up to
rounding (tests). The keys of the root and of a prompt reach the rows that read them through
index_select and expand, whose backwards add the gradients back into the one computation.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_ACTIVE = threading.local()


def active_packed_pass() -> PackedPass | None:
    """The packed pass whose `attending()` block this thread is in, if any."""
    return getattr(_ACTIVE, "packed", None)


class PackedPass:
    """Attention bookkeeping for one packed pass.

    root: length of the shared start (0: none); prompt_lengths [U]: each distinct prompt's own
    tokens after the root; source [R]: each suffix row's prompt among them; suffix_real [R, S]
    (bool): each row's real suffix tokens, right-padded. The packed row holds the root's tokens, then
    each prompt's, then each suffix's, in that order.
    """

    def __init__(self, root: int, prompt_lengths: torch.Tensor, source: torch.Tensor, suffix_real: torch.Tensor) -> None:
        prompts, width = len(prompt_lengths), int(prompt_lengths.max())
        suffixes, span = suffix_real.shape
        first_prompt = 1 if root else 0
        self.first_suffix = first_prompt + prompts
        self.root, self.width = root, width
        self.grid_rows, self.columns = self.first_suffix + suffixes, max(root, width, span)
        real = torch.zeros(self.grid_rows, self.columns, dtype=torch.bool)
        real[0, :root] = root > 0
        real[first_prompt : self.first_suffix] = torch.arange(self.columns)[None] < prompt_lengths[:, None]
        real[self.first_suffix :, :span] = suffix_real
        self.index = real.flatten().nonzero().flatten()
        self.suffix_index = suffix_real.flatten().nonzero().flatten()
        self.suffix_shape = (suffixes, span)
        # the grid row whose prompt keys each row reads (only suffix rows use theirs; the others
        # read their own, masked out)
        self.prompt_row = torch.arange(self.grid_rows)
        self.prompt_row[self.first_suffix :] = first_prompt + source
        self.mask = self._mask(real, prompt_lengths, source, first_prompt)
        self.calls = 0

    def _mask(self, real: torch.Tensor, prompt_lengths: torch.Tensor, source: torch.Tensor, first_prompt: int) -> torch.Tensor:
        """[G, 1, Q, root + width + Q], True = attend. Padded queries see real keys too, so no
        row of the softmax is empty; their outputs are never read."""
        rows, columns = real.shape
        own = torch.ones(columns, columns, dtype=torch.bool).tril()[None] & real[:, None, :]
        prompt = torch.zeros(rows, self.width, dtype=torch.bool)
        prompt[self.first_suffix :] = torch.arange(self.width)[None] < prompt_lengths[source][:, None]
        root = torch.zeros(rows, self.root, dtype=torch.bool)
        root[first_prompt:] = True
        seen = torch.cat([root, prompt], dim=1)[:, None, :].expand(rows, columns, self.root + self.width)
        return torch.cat([seen, own], dim=2).unsqueeze(1)

    @contextlib.contextmanager
    def attending(self) -> Iterator[None]:
        outer = active_packed_pass()
        _ACTIVE.packed = self
        try:
            yield
        finally:
            _ACTIVE.packed = outer

    def rows(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed query [1, H, N, D] and key/value [1, Hkv, N, D] of one decoder layer -> query
        [G, H, Q, D], keys and values [G, Hkv, root + width + Q, D] and the mask [G, 1, Q, ...]."""
        self.calls += 1
        return self._grid(query), self._keys(self._grid(key)), self._keys(self._grid(value)), self.mask

    def _keys(self, grid: torch.Tensor) -> torch.Tensor:
        parts = [grid[:, :, : self.width].index_select(0, self.prompt_row), grid]
        if self.root:
            parts.insert(0, grid[:1, :, : self.root].expand(self.grid_rows, -1, -1, -1))
        return torch.cat(parts, dim=2)

    def packed(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [G, Q, H, D] -> [1, N, H, D], the real tokens in packed order."""
        return out.reshape(self.grid_rows * self.columns, *out.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def suffixes(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pass's output [1, N, ...] -> the suffix rows' values [R, S, ...], zero at padding."""
        tail = hidden[0, hidden.shape[1] - len(self.suffix_index) :]
        rows, span = self.suffix_shape
        wide = tail.new_zeros(rows * span, *tail.shape[1:]).index_copy(0, self.suffix_index, tail)
        return wide.view(rows, span, *tail.shape[1:])

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        """[1, h, N, D] -> [G, h, Q, D], zero at padding (index_copy: its backward gathers)."""
        flat = t[0].transpose(0, 1)
        wide = flat.new_zeros(self.grid_rows * self.columns, *flat.shape[1:]).index_copy(0, self.index, flat)
        return wide.view(self.grid_rows, self.columns, *flat.shape[1:]).transpose(1, 2)
