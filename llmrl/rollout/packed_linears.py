"""The hf engine's linear layers as fewer, pre-packed matrix products.

Decode multiplies a few dozen rows by every weight of the model, one token at a time. At those
shapes a CPU matmul spends much of its time outside the arithmetic:
- each call re-lays the plain [out, in] weight out for its kernel;
- the three projections of attention (q, k, v) and the two of the MLP's input (gate, up) read
  the same input in separate, narrow calls.

So for inference only:
- Linears that read the same input become one group with one weight, [sum of outs, in]. The
  first member called computes every member's output in one product and keeps the others'
  slices for their own calls.
- The group's weight is packed once, in one of four forms:
  - panels of 16 output columns for llmrl's own fp32 product (llmrl/kernels/panel_gemm.cpp),
    which fetches the next block of the weight while it multiplies the current one, on AVX2
    CPUs without AVX-512 (llmrl/rollout/packed_copies.py);
  - the same for bf16 weights (llmrl/kernels/panel_gemm_bf16.cpp), on CPUs with AVX512-BF16
    and without AMX;
  - MKL's packed GEMM (`cblas_sgemm_pack`/`cblas_sgemm_compute`), for fp32 weights where MKL
    runs its Intel kernels: on an Intel CPU, or an AMD one under llmrl's preload
    (llmrl/mkl_on_amd.py). The copy lives in a mapping of its own, packed again in place
    (llmrl/rollout/packed_copies.py); where llmrl's kernels cannot be built, torch's
    `torch.ops.mkl._mkl_reorder_linear_weight` and `_mkl_linear` make it instead;
  - otherwise oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`), the form
    torch's own compiler uses for frozen CPU linears, multiplied by
    `torch.ops.mkldnn._linear_pointwise`.

Each member's `weight` stays a parameter under its own name, now a view into the group's weight,
so `load_weights` and `state_dict` see the model as before. Writing into any member's weight
bumps its version counter; the group re-packs before its next product when a version moved.

Measured on 2 AMD EPYC cores (docs/benchmarks.md): bf16 for oneDNN at 32 rows, q/k/v 182 -> 111 us,
gate/up 377 -> 296 us, down 213 -> 163 us; fp32 for MKL under the preload, a 128-token rollout of
32 rows 310 -> 367 tok/s and of 64 rows 390 -> 430. With many threads the packed product is slower, so the engine's
default (`auto`) packs only where `packing_pays`; `bench/packed_linears.py` times the forms.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmrl import mkl_on_amd
from llmrl.host_memory import own_mappings
from llmrl.rollout.packed_copies import Bf16PanelCopy, MklPackedCopy, PanelCopy, bf16_panels_pay, panels_pay
from llmrl.precision import cpu_field

# `auto` packs only up to this many torch threads. On an Intel Xeon with AMX (torch 2.11), bf16,
# one layer's decode products ran 1.29-1.36x faster packed at 2 and 4 threads, but 0.74-0.77x at
# 8 and 0.41-0.52x at 16: oneDNN's packed small-batch product does not spread over many threads.
AUTO_MAX_THREADS = 4
# fp32 products on a CPU go to torch's BLAS, MKL in the x86 wheels, which is tuned for Intel's
# CPUs; oneDNN's packed product is not. At 2 threads, one layer's fp32 decode products ran
# 1.50-1.76x faster packed on an AMD EPYC, and 0.76-1.09x on an Intel Xeon (docs/benchmarks.md).
# So `auto` packs fp32 weights only on these vendors (/proc/cpuinfo's vendor_id). Where llmrl's
# preload has MKL take its tuned kernels there (llmrl/mkl_on_amd.py), the packing is MKL's own:
# on 2 Zen 2 cores one layer's fp32 decode products ran faster through plain MKL than packed for
# oneDNN, and faster again through MKL's packed form. Without the preload MKL's packed form is
# the slowest of the three (a 32-row rollout at 210 tok/s, against 280 packed for oneDNN).
FP32_PACKING_VENDORS = ("AuthenticAMD",)

# Sibling linears that read the same input, by attribute name, in the order models call them.
SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Linears that read an input of their own; packed alone. The lm_head is left out: a group copies
# its members' weights, and the head often shares its weight with the embedding. The fused decode
# step packs the head through `PackedWeight`, which keeps the tie.
SINGLES: tuple[str, ...] = ("o_proj", "down_proj")


def _onednn_multiplies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch can pack and multiply weights of `dtype` on `device` with oneDNN."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def mkl_takes_intel_kernels() -> bool:
    """Whether torch's MKL runs the kernels it tunes for Intel CPUs here: on an Intel CPU, or on an
    AMD one under llmrl's preload."""
    if not torch.backends.mkl.is_available():
        return False
    return mkl_on_amd.in_effect() or cpu_field("vendor_id") == "GenuineIntel"


def _mkl_packed_product(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x [M, in] -> x @ weight.T + bias through MKL's packed copy of an fp32 `weight`, or None
    where this torch lacks MKL's packed ops."""
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows_hint)
    except (RuntimeError, AttributeError):
        return None
    # torch multiplies by the packed copy only when the input's row count equals the count it is
    # given, and by `weight` otherwise; MKL's packed B does not depend on the rows, so each call
    # passes its own (tests/test_packed_linears.py checks every row count against float64).
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])


def _packed_product(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x [M, in] -> x @ weight.T + bias through a packed copy of `weight`: MKL's for fp32 where
    `mkl_takes_intel_kernels`, else oneDNN's; None where neither can pack it (a GPU tensor, a
    dtype oneDNN does not multiply here, a torch without either)."""
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and mkl_takes_intel_kernels():
        product = _mkl_packed_product(weight, bias, rows_hint)
        if product is not None:
            return product
    if not _onednn_multiplies(weight.dtype, weight.device):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        product = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: E731
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
        if product(probe).shape != (1, weight.shape[0]):
            return None
    except (RuntimeError, AttributeError):  # an op this build lacks, or refuses for this layout
        return None
    return product


def packing_pays(dtype: torch.dtype, device: torch.device) -> bool:
    """The `auto` rule (rollout.packed_linears), on a CPU with at most AUTO_MAX_THREADS torch
    threads: bf16 weights where bf16 is multiplied natively, and fp32 weights on a CPU of
    FP32_PACKING_VENDORS (for MKL under the preload, else for oneDNN)."""
    if not _onednn_multiplies(dtype, device) or torch.get_num_threads() > AUTO_MAX_THREADS:
        return False
    if dtype == torch.bfloat16:
        return True
    return dtype == torch.float32 and cpu_field("vendor_id") in FP32_PACKING_VENDORS


def groupable(linears: list[nn.Linear]) -> bool:
    """One input width, and a bias on all or none: what one product can stand in for."""
    return len({linear.in_features for linear in linears}) == 1 and len({linear.bias is None for linear in linears}) == 1


class PackedWeight:
    """x [rows, in] -> x @ weight.T + bias, through a packed copy of `weight` when `pack` (and
    this torch can pack it), rebuilt before the next product whenever `weight` or `bias` was
    written in place since (their version counters moved). The tensors stay the caller's: a
    weight tied to another module stays tied."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, rows_hint: int) -> None:
        self.weight, self.bias = weight, bias
        self.pack, self.rows_hint = pack, rows_hint
        self._product: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._versions: tuple[int, int] | None = None
        self._mkl_copy = MklPackedCopy(rows_hint)
        self._panel_copy = PanelCopy()
        self._bf16_panel_copy = Bf16PanelCopy()

    def _current_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        versions = (self.weight._version, -1 if self.bias is None else self.bias._version)
        if versions != self._versions:  # first call, or a weight was written since the last pack
            # Let the old packed copy go first, so that the new one can take its memory. Packed
            # after every weight sync in a process that also trains, the lm_head's 57 MB copy
            # (bf16) otherwise needed a fresh block each step while the old one was held, and
            # the trainer's allocations split the freed ones: the quickstart's peak RSS grew by
            # about 110 MB a step, to 8.0 GiB against 6.1 (docs/benchmarks.md).
            self._product = None
            packed = self._pack() if self.pack else None
            self._product = packed or (lambda x: nn.functional.linear(x, self.weight, self.bias))
            self._versions = versions
        assert self._product is not None
        return self._product

    def _pack(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        # llmrl's panels where they pay (fp32 or bf16), else for fp32 MKL's packed form where MKL
        # runs its Intel kernels, each in a mapping of its own, packed again in place
        # (llmrl/rollout/packed_copies.py); a copy of another dtype than the weight's says None
        forms = ((self._panel_copy, panels_pay), (self._bf16_panel_copy, bf16_panels_pay), (self._mkl_copy, mkl_takes_intel_kernels))
        for copy, pays in forms:
            product = copy.product(self.weight, self.bias) if copy.dtype == self.weight.dtype and pays() else None
            if product is not None:
                return product
        with own_mappings():  # see own_mappings: replaced after every sync, so kept off the heap where it can be
            return _packed_product(self.weight, self.bias, self.rows_hint)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self._current_product()(x)


class LinearGroup(PackedWeight):
    """The shared weight of linears that read one input, and the outputs not yet collected."""

    def __init__(self, linears: list[nn.Linear], pack: bool, rows_hint: int) -> None:
        if not groupable(linears):
            raise ValueError("a group's linears must read inputs of one width and all have a bias or none")
        with torch.no_grad():
            weight = torch.cat([linear.weight.detach() for linear in linears])
            has_bias = linears[0].bias is not None
            bias = torch.cat([linear.bias.detach() for linear in linears]) if has_bias else None
        super().__init__(weight, bias, pack, rows_hint)
        self.sizes = [linear.out_features for linear in linears]
        start = 0
        for linear, size in zip(linears, self.sizes):
            # Views of the group's tensors: they share its version counter, so a write through any
            # member's parameter shows in `self.weight._version` (or the bias's).
            linear.weight = nn.Parameter(self.weight[start : start + size], requires_grad=False)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias[start : start + size], requires_grad=False)
            start += size
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._pending: dict[int, torch.Tensor] = {}

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for input `x`, from the pending ones when `x` is the very
        tensor (unchanged) that the last product was computed for."""
        if self._input is x and x._version == self._input_version and index in self._pending:
            out = self._pending.pop(index)
            if not self._pending:
                self._input = None  # all collected: let the input go
            return out
        flat = x.reshape(-1, x.shape[-1])
        y = self._current_product()(flat).view(*x.shape[:-1], -1)
        parts = y.split(self.sizes, dim=-1)
        self._pending = {i: part for i, part in enumerate(parts) if i != index}
        self._input, self._input_version = (x, x._version) if self._pending else (None, -1)
        return parts[index]


class GroupedLinear(nn.Linear):
    """An nn.Linear whose product comes from its group (same weight and bias, same result up to
    the kernel's rounding)."""

    group: LinearGroup
    index: int

    @classmethod
    def adopt(cls, linear: nn.Linear, group: LinearGroup, index: int) -> GroupedLinear:
        linear.__class__ = cls  # keeps the module's parameters, hooks and name in the model
        linear.group, linear.index = group, index  # type: ignore[attr-defined]
        return linear  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)


def pack_linears(model: nn.Module, pack: bool = True, rows_hint: int = 32) -> int:
    """Group and pack the decoder's linears in place for inference; returns the number of groups.
    `pack=False` groups siblings but multiplies with the plain `linear`."""
    groups = 0
    for module in list(model.modules()):
        plans = [names for names in SIBLINGS if all(isinstance(getattr(module, n, None), nn.Linear) for n in names)]
        plans += [(name,) for name in SINGLES if isinstance(getattr(module, name, None), nn.Linear)]
        for names in plans:
            linears = [getattr(module, n) for n in names]
            if any(isinstance(linear, GroupedLinear) for linear in linears):
                continue  # already grouped
            if not groupable(linears):
                continue  # not one input, or a bias on some only: leave them as they are
            group = LinearGroup(linears, pack, rows_hint)
            for index, linear in enumerate(linears):
                GroupedLinear.adopt(linear, group, index)
            groups += 1
    return groups
