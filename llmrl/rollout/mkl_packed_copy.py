"""MKL's packed copy of an fp32 weight, kept in a memory mapping of its own and packed again in
place when the weight changes.

The hf engine packs its fp32 decode weights for MKL where MKL runs its Intel kernels
(llmrl/rollout/packed_linears.py), and packs them again after every weight sync. torch's own
packing op takes each copy from malloc. In a process that also trains (the quickstart), glibc
placed the copies in free chunks of the heap between the trainer's short-lived buffers, and the
resident size settled about 1.9 GiB above the unpacked run's instead of the copies' 0.6 GiB
(docs/benchmarks.md, "Packed copies outside the heap"). Here each copy lives in an anonymous
mapping made once (`llmrl/kernels/mkl_packed_gemm.cpp`): a re-pack writes the same pages and
allocates nothing, and the heap never holds a copy.
"""
from __future__ import annotations

from typing import Callable

import torch

from llmrl import kernels


def mkl_packing_ops_here() -> bool:
    """Whether llmrl's kernels load and find MKL's packed GEMM in this torch."""
    return kernels.load(kernels.DECODE) and torch.ops.llmrl_kernels.mkl_packed_bytes(1, 1, 1) > 0


class MklPackedCopy:
    """One weight's packed copy: `product(weight, bias)` packs (into the buffer it already holds,
    when the shape did not change) and returns x [rows, in] -> x @ weight.T + bias."""

    def __init__(self, rows_hint: int) -> None:
        self.rows_hint = rows_hint
        self.buffer: torch.Tensor | None = None

    def product(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """None where the kernels or MKL's packed GEMM are missing here, or `weight` is not an
        fp32 CPU matrix."""
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2 or not mkl_packing_ops_here():
            return None
        ops = torch.ops.llmrl_kernels
        out_features, in_features = weight.shape
        size = ops.mkl_packed_bytes(self.rows_hint, out_features, in_features)
        if self.buffer is None or self.buffer.numel() != size:
            self.buffer = None  # unmapped before the new one is made
            self.buffer = ops.mapped_buffer(size)
        ops.mkl_pack_(self.buffer, weight.contiguous(), self.rows_hint)
        buffer = self.buffer
        return lambda x: ops.mkl_packed_linear(x, buffer, out_features, bias)
