"""Packed copies of decode weights in mappings of their own: MKL's form and llmrl's fp32 and bf16
panels, packed again in place and never taken from malloc (MKL's products for every row count:
tests/test_packed_linears.py; the panels' here)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from llmrl.rollout import packed_linears
from llmrl.rollout.packed_copies import (
    PANEL_MAX_ROWS,
    Bf16PanelCopy,
    MklPackedCopy,
    PanelCopy,
    bf16_panel_ops_here,
    mkl_packing_ops_here,
    panel_ops_here,
)
from llmrl.rollout.packed_linears import PackedWeight

needs_mkl = pytest.mark.skipif(not mkl_packing_ops_here(), reason="llmrl's kernels or this torch's MKL packed GEMM are missing")
needs_panels = pytest.mark.skipif(not panel_ops_here(), reason="llmrl's kernels have no panel product here (no AVX2/FMA)")
needs_bf16_panels = pytest.mark.skipif(not bf16_panel_ops_here(), reason="llmrl's kernels have no bf16 panel product here (no AVX512-BF16)")
PANELS = [pytest.param(torch.float32, marks=needs_panels, id="fp32"), pytest.param(torch.bfloat16, marks=needs_bf16_panels, id="bf16")]
PANEL_COPY = {torch.float32: PanelCopy, torch.bfloat16: Bf16PanelCopy}


@needs_mkl
def test_a_new_weight_is_packed_into_the_same_buffer():
    torch.manual_seed(4)
    copy = MklPackedCopy(rows_hint=8)
    weight = torch.randn(64, 24)
    copy.product(weight, None)
    buffer = copy.buffer.data_ptr()
    weight.copy_(torch.randn(64, 24))
    product = copy.product(weight, None)
    assert copy.buffer.data_ptr() == buffer
    x = torch.randn(8, 24)
    torch.testing.assert_close(product(x).double(), x.double() @ weight.double().T, atol=1e-4, rtol=1e-5)
    copy.product(torch.randn(32, 24), None)  # another shape takes a buffer of its size
    assert copy.buffer.numel() == torch.ops.llmrl_kernels.mkl_packed_bytes(8, 32, 24)


@pytest.mark.parametrize(
    "form",
    [pytest.param("mkl", marks=needs_mkl), pytest.param("panels", marks=needs_panels), pytest.param("bf16-panels", marks=needs_bf16_panels)],
)
def test_packed_weight_takes_its_form_and_repacks_in_place_after_a_write(monkeypatch, form):
    """MKL's form where MKL runs its Intel kernels; panels where they pay (they come first)."""
    monkeypatch.setattr(packed_linears, "mkl_takes_intel_kernels", lambda: form == "mkl")
    monkeypatch.setattr(packed_linears, "panels_pay", lambda: form == "panels")
    monkeypatch.setattr(packed_linears, "bf16_panels_pay", lambda: form == "bf16-panels")
    dtype = torch.bfloat16 if form == "bf16-panels" else torch.float32
    tolerance = dict(atol=1e-2, rtol=2**-7) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    weight, bias = torch.randn(40, 16, dtype=dtype), torch.randn(40, dtype=dtype)
    packed = PackedWeight(weight, bias, pack=True, rows_hint=4)
    copies = {"mkl": packed._mkl_copy, "panels": packed._panel_copy, "bf16-panels": packed._bf16_panel_copy}
    copy = copies.pop(form)
    x = torch.randn(4, 16, dtype=dtype)
    torch.testing.assert_close(packed.product(x), torch.nn.functional.linear(x, weight, bias), **tolerance)
    buffer = copy.buffer.data_ptr()
    assert all(other.buffer is None for other in copies.values())
    with torch.no_grad():
        weight.mul_(-2.0)  # as a weight sync writes in place
    torch.testing.assert_close(packed.product(x), torch.nn.functional.linear(x, weight, bias), **tolerance)
    assert copy.buffer.data_ptr() == buffer
    if form == "panels":
        assert copy.buffer.numel() == 3 * 16 * 16 * 4  # 40 columns in 3 panels of 16, 16 k
    if form == "bf16-panels":
        assert copy.buffer.numel() == 3 * 8 * 64  # 3 panels of 8 lines: 16 k in pairs, 16 columns of 2 bf16


@needs_mkl
def test_the_copy_is_refused_for_other_dtypes():
    assert MklPackedCopy(rows_hint=4).product(torch.randn(8, 8, dtype=torch.bfloat16), None) is None
    with pytest.raises(RuntimeError, match="rows_hint"):
        torch.ops.llmrl_kernels.mkl_packed_bytes(0, 8, 8)


@pytest.mark.parametrize("dtype", PANELS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(48, 40), (37, 131), (3072, 576), (17, 1)])
def test_panels_serve_every_row_count(shape, bias, dtype):
    """Panels of 16 columns and blocks of 128 k (fp32) or 192 pairs of k (bf16): widths that fill
    neither (37 columns, 131 k: odd, so bf16's last pair is half padding) end in a partial panel
    and a partial block. The plain weight is zeroed after packing for the rows the panels serve,
    so a product that read it would give the bias alone. bf16 sums in fp32 and rounds once: within
    one bf16 step (2^-8 relative) of the exact product rounded."""
    torch.manual_seed(6)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, dtype=dtype)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    tolerance = dict(atol=1e-4, rtol=2**-7) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
    want_weight = weight.double().clone()
    product = PANEL_COPY[dtype]().product(weight, b)
    assert product is not None
    weight.zero_()
    for rows in (0, 1, 2, 5, 6, 7, 12, 13, 16, 17, 29, 31, 32, 33, 47, PANEL_MAX_ROWS):
        x = torch.randn(rows, in_features, dtype=dtype)
        want = (x.double() @ want_weight.T + (b.double() if bias else 0)).to(dtype).double()
        got = product(x)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        torch.testing.assert_close(got.double(), want, **tolerance)
    if dtype == torch.float32:
        weight.copy_(want_weight)  # above PANEL_MAX_ROWS the plain weight multiplies
    # bf16: the panels multiply at any row count (a prefill's), the plain weight still zero
    for rows in (PANEL_MAX_ROWS + 1, 300):
        x = torch.randn(rows, in_features, dtype=dtype)
        want = (x.double() @ want_weight.T + (b.double() if bias else 0)).to(dtype).double()
        torch.testing.assert_close(product(x).double(), want, **tolerance)


@needs_panels
def test_panels_refuse_what_they_cannot_multiply():
    assert PanelCopy().product(torch.randn(8, 8, dtype=torch.bfloat16), None) is None
    ops = torch.ops.llmrl_kernels
    buffer = ops.mapped_buffer(ops.panel_bytes(8, 8))
    with pytest.raises(RuntimeError, match="at least panel_bytes"):
        ops.panel_linear(torch.randn(2, 8), buffer, 64, None)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ops.pack_panels_(buffer, torch.randn(8, 8))
        ops.panel_linear(torch.randn(2, 8), buffer, 8, torch.randn(7))


@needs_bf16_panels
def test_bf16_panels_refuse_what_they_cannot_multiply():
    assert Bf16PanelCopy().product(torch.randn(8, 8), None) is None  # fp32: PanelCopy's
    ops = torch.ops.llmrl_kernels
    buffer = ops.mapped_buffer(ops.panel_bf16_bytes(8, 8))
    with pytest.raises(RuntimeError, match="at least panel_bf16_bytes"):
        ops.panel_linear_bf16(torch.randn(2, 8, dtype=torch.bfloat16), buffer, 64, None)
    with pytest.raises(RuntimeError, match="weight must be a bfloat16"):
        ops.pack_panels_bf16_(buffer, torch.randn(8, 8))
    ops.pack_panels_bf16_(buffer, torch.randn(8, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bias must be bfloat16"):
        ops.panel_linear_bf16(torch.randn(2, 8, dtype=torch.bfloat16), buffer, 8, torch.randn(8))
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        ops.panel_linear_bf16(torch.randn(2, 8), buffer, 8, None)


HEAP_PROBE = """
import ctypes, torch
from llmrl.host_memory import keep_freed_memory
import sys
from llmrl.rollout.packed_copies import Bf16PanelCopy, MklPackedCopy, PanelCopy
assert keep_freed_memory()
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def malloced():  # bytes malloc hands out now: in use in the heap, and in its own mmaps
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
make = {"mkl": lambda: MklPackedCopy(rows_hint=32), "panels": PanelCopy, "bf16-panels": Bf16PanelCopy}[sys.argv[1]]
dtype = make().dtype
make().product(torch.randn(8, 8, dtype=dtype), None)  # loads the kernels, warms the product up
weight = torch.randn(3072, 576, dtype=dtype)
before = malloced()
plain = torch.empty(weight.numel() * weight.element_size(), dtype=torch.uint8)  # what torch's packing op allocates
malloc_grew = malloced() - before
del plain
copy = make()
before = malloced()
copy.product(weight, None)
copy_grew = malloced() - before
print(malloc_grew >> 20, copy_grew >> 20, copy.buffer.numel() >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallinfo2 is glibc's")
@pytest.mark.parametrize(
    "form",
    [pytest.param("mkl", marks=needs_mkl), pytest.param("panels", marks=needs_panels), pytest.param("bf16-panels", marks=needs_bf16_panels)],
)
def test_the_copy_is_not_taken_from_malloc(form):
    """A packed copy from malloc landed in the heap's freed chunks between the trainer's buffers;
    this one is a mapping of its own, so malloc's count of bytes handed out does not move."""
    env = {k: v for k, v in os.environ.items() if k != "LLMRL_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, form], capture_output=True, text=True, timeout=300, env=env, check=True)
    malloc_grew, copy_grew, copy_size = (int(v) for v in out.stdout.split()[-3:])
    assert malloc_grew >= 3 and copy_size >= 3 and copy_grew < 1, out.stdout  # MiB (bf16: 3.4)
