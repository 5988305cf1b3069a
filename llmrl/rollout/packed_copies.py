"""Packed copies of the hf engine's decode weights, each kept in a memory mapping of its own and
packed again in place when the weight changes.

Three forms, all made by llmrl's kernels:
- `PanelCopy` (llmrl/kernels/panel_gemm.cpp): the weight as panels of 16 output columns,
  multiplied by llmrl's own AVX2 product, which fetches the next block of the weight from memory
  while it multiplies the current one. Decode at a few dozen rows reads every weight once per
  step, and there MKL's packed product waits on memory: 152-157 against 142-145 GFLOP/s for a
  32-row pass over SmolLM2-135M's weights, a 32-row rollout 1.08x faster and a 64-row one level
  (docs/benchmarks.md). Measured on AVX2 CPUs without AVX-512 only (2 Zen 2 cores), so only
  those take it.
- `Bf16PanelCopy` (llmrl/kernels/panel_gemm_bf16.cpp): the same for bf16 weights, with pairs of
  k side by side for AVX512-BF16's dot-product instruction. Over SmolLM2-135M's weights on 2 Zen 4
  cores a 32-row pass ran 1.13-1.15x faster than oneDNN's packed bf16 product, and a 64-row one
  1.04-1.07x (docs/benchmarks.md). Measured on a CPU without AMX only, so CPUs with AMX keep oneDNN,
  which multiplies on AMX's tiles there.
- `MklPackedCopy`: MKL's own packed GEMM (`cblas_sgemm_pack`/`cblas_sgemm_compute`), where MKL
  runs its Intel kernels.

Why mappings of their own: torch's packing op takes each copy from malloc. In a process that
also trains (the quickstart), glibc placed the copies in free chunks of the heap between the
trainer's short-lived buffers, and the resident size settled about 1.9 GiB above the unpacked
run's instead of the copies' 0.6 GiB (docs/benchmarks.md, "Packed copies outside the heap"). A
mapping made once (`mapped_buffer` in llmrl/kernels/mkl_packed_gemm.cpp) is written again in
place after each sync, allocates nothing, and is never part of the heap.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch

from llmrl import kernels
from llmrl.precision import cpu_field

Product = Callable[[torch.Tensor], torch.Tensor]

# Above this many rows an fp32 panel copy's product goes to the plain weight (torch's BLAS). The panel
# product is built for decode's few dozen rows, where a call reads the weight once. With more rows
# its partial sums, rewritten once per block of 128 k, outgrow the cache: over SmolLM2-135M's
# weights on 2 Zen 2 cores it ran at 166 against the plain weight's 164 GFLOP/s at 128 rows, 161
# against 168 at 200 and 149 against 181 at 556 (a prefill).
PANEL_MAX_ROWS = 128


def mkl_packing_ops_here() -> bool:
    """Whether llmrl's kernels load and find MKL's packed GEMM in this torch."""
    return kernels.load(kernels.DECODE) and torch.ops.llmrl_kernels.mkl_packed_bytes(1, 1, 1) > 0


def panel_ops_here() -> bool:
    """Whether llmrl's kernels load with the panel product (built where the CPU has AVX2 and FMA)."""
    return kernels.load(kernels.DECODE) and torch.ops.llmrl_kernels.panel_bytes(1, 1) > 0


def bf16_panel_ops_here() -> bool:
    """Whether llmrl's kernels load with the bf16 panel product (built where the CPU has AVX512-BF16)."""
    return kernels.load(kernels.DECODE) and torch.ops.llmrl_kernels.panel_bf16_bytes(1, 1) > 0


def panels_pay() -> bool:
    """Where the panel product is the fp32 decode product: an AVX2 CPU without AVX-512, the only
    kind it was measured on. With AVX-512, MKL's kernels use vectors twice as wide."""
    return "avx512f" not in cpu_field("flags").split() and panel_ops_here()


def bf16_panels_pay() -> bool:
    """Where the bf16 panel product is the bf16 decode product: a CPU with AVX512-BF16 and without
    AMX, the kind it was measured on. With AMX, oneDNN's product runs on its tiles."""
    return "amx_bf16" not in cpu_field("flags").split() and bf16_panel_ops_here()


class _MappedCopy(abc.ABC):
    """A weight's copy in a mapping of its own: `product(weight, bias)` packs it (into the mapping
    it already holds, when the shape did not change) and returns x [rows, in] -> x @ weight.T +
    bias; None where this form cannot be made here or `weight` is not a CPU matrix of its dtype."""

    dtype = torch.float32

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def product(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Product | None:
        if weight.dtype != self.dtype or weight.device.type != "cpu" or weight.dim() != 2 or not self._ops_here():
            return None
        size = self._bytes(*weight.shape)
        if self.buffer is None or self.buffer.numel() != size:
            self.buffer = None  # unmapped before the new one is made
            self.buffer = torch.ops.llmrl_kernels.mapped_buffer(size)
        self._pack_into(self.buffer, weight)
        return self._product(self.buffer, weight, bias)

    @abc.abstractmethod
    def _ops_here(self) -> bool:
        """Whether this form's kernels load here."""

    @abc.abstractmethod
    def _bytes(self, out_features: int, in_features: int) -> int:
        """The copy's size in bytes for a weight [out_features, in_features]."""

    @abc.abstractmethod
    def _pack_into(self, buffer: torch.Tensor, weight: torch.Tensor) -> None:
        """Writes `weight` into `buffer` in this form."""

    @abc.abstractmethod
    def _product(self, buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
        """x [rows, in] -> x @ weight.T + bias through the copy in `buffer`."""


class MklPackedCopy(_MappedCopy):
    """One weight's copy in MKL's packed form."""

    def __init__(self, rows_hint: int) -> None:
        super().__init__()
        self.rows_hint = rows_hint

    def _ops_here(self) -> bool:
        return mkl_packing_ops_here()

    def _bytes(self, out_features: int, in_features: int) -> int:
        return torch.ops.llmrl_kernels.mkl_packed_bytes(self.rows_hint, out_features, in_features)

    def _pack_into(self, buffer: torch.Tensor, weight: torch.Tensor) -> None:
        torch.ops.llmrl_kernels.mkl_pack_(buffer, weight.contiguous(), self.rows_hint)

    def _product(self, buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
        out_features = weight.shape[0]
        return lambda x: torch.ops.llmrl_kernels.mkl_packed_linear(x, buffer, out_features, bias)


class PanelCopy(_MappedCopy):
    """One fp32 weight's copy as panels: multiplied through them up to `max_rows` rows, and by
    the plain weight above."""

    max_rows: int | None = PANEL_MAX_ROWS

    def _ops_here(self) -> bool:
        return panel_ops_here()

    def _bytes(self, out_features: int, in_features: int) -> int:
        return torch.ops.llmrl_kernels.panel_bytes(out_features, in_features)

    def _pack_into(self, buffer: torch.Tensor, weight: torch.Tensor) -> None:
        torch.ops.llmrl_kernels.pack_panels_(buffer, weight)

    def _panel_product(self, x: torch.Tensor, buffer: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.llmrl_kernels.panel_linear(x, buffer, out_features, bias)

    def _product(self, buffer: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
        out_features = weight.shape[0]

        def product(x: torch.Tensor) -> torch.Tensor:
            if self.max_rows is not None and x.shape[0] > self.max_rows:
                return torch.nn.functional.linear(x, weight, bias)
            return self._panel_product(x, buffer, out_features, bias)

        return product


class Bf16PanelCopy(PanelCopy):
    """One bf16 weight's copy as pair-interleaved panels, multiplied through them at any row count.

    torch's plain bf16 product is slower up to a few hundred rows and about level above: over
    SmolLM2-135M's weights on 2 Zen 4 cores the panels ran at 379-381 against 334-342 GFLOP/s at
    128 rows, 389 against 341 at 300, 362-376 against 376-384 at 556 and 382 against 375 at 1000
    (a prefill). One form for every row count keeps one copy of the weights."""

    dtype = torch.bfloat16
    max_rows = None

    def _ops_here(self) -> bool:
        return bf16_panel_ops_here()

    def _bytes(self, out_features: int, in_features: int) -> int:
        return torch.ops.llmrl_kernels.panel_bf16_bytes(out_features, in_features)

    def _pack_into(self, buffer: torch.Tensor, weight: torch.Tensor) -> None:
        torch.ops.llmrl_kernels.pack_panels_bf16_(buffer, weight)

    def _panel_product(self, x: torch.Tensor, buffer: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.llmrl_kernels.panel_linear_bf16(x, buffer, out_features, bias)
