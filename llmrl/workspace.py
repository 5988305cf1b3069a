"""Scratch buffers kept across calls, one set per thread.

torch's CPU allocator hands every large block back to the kernel when it is freed, so a fresh
tensor of tens of megabytes is faulted in and zeroed again on each allocation; at the sizes of
a vocabulary-wide logits chunk or an attention score matrix that costs more than the arithmetic
done in it (docs/benchmarks.md). Code whose intermediate values die before it returns takes
them from here instead. A buffer handed out under a name is valid until the next request for
that name on the same thread, so a caller uses each name for one value at a time.
"""
from __future__ import annotations

import math
import threading

import torch


class Workspace:
    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device, exact: bool = False) -> torch.Tensor:
        """A contiguous tensor of `shape` under `name`; its contents are whatever was left there.
        `exact`: never hold more than asked (a caller that sizes its room against a budget)."""
        key = (name, dtype, device)
        size = math.prod(shape)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < size:
            self.buffers.pop(key, None)  # free the smaller one before allocating its successor
            # an eighth more than asked when it grows: the next batch, a little longer, fits
            room = size if buf is None or exact else size + size // 8
            buf = self.buffers[key] = torch.empty(room, dtype=dtype, device=device)
        return buf[:size].view(shape)


_LOCAL = threading.local()


def workspace() -> Workspace:
    """This thread's workspace."""
    if not hasattr(_LOCAL, "workspace"):
        _LOCAL.workspace = Workspace()
    return _LOCAL.workspace
