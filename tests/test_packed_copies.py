"""Packed copies of fp32 decode weights in mappings of their own: MKL's form and llmrl's panels,
packed again in place and never taken from malloc (MKL's products for every row count:
tests/test_packed_linears.py; the panels' here)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from llmrl.rollout import packed_linears
from llmrl.rollout.packed_copies import PANEL_MAX_ROWS, MklPackedCopy, PanelCopy, mkl_packing_ops_here, panel_ops_here
from llmrl.rollout.packed_linears import PackedWeight

needs_mkl = pytest.mark.skipif(not mkl_packing_ops_here(), reason="llmrl's kernels or this torch's MKL packed GEMM are missing")
needs_panels = pytest.mark.skipif(not panel_ops_here(), reason="llmrl's kernels have no panel product here (no AVX2/FMA)")


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


@pytest.mark.parametrize("form", [pytest.param("mkl", marks=needs_mkl), pytest.param("panels", marks=needs_panels)])
def test_packed_weight_takes_its_form_and_repacks_in_place_after_a_write(monkeypatch, form):
    """MKL's form where MKL runs its Intel kernels; panels where they pay (they come first)."""
    monkeypatch.setattr(packed_linears, "mkl_takes_intel_kernels", lambda: form == "mkl")
    monkeypatch.setattr(packed_linears, "panels_pay", lambda: form == "panels")
    torch.manual_seed(5)
    weight, bias = torch.randn(40, 16), torch.randn(40)
    packed = PackedWeight(weight, bias, pack=True, rows_hint=4)
    copy, other = (packed._mkl_copy, packed._panel_copy) if form == "mkl" else (packed._panel_copy, packed._mkl_copy)
    x = torch.randn(4, 16)
    torch.testing.assert_close(packed.product(x), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    buffer = copy.buffer.data_ptr()
    assert other.buffer is None
    with torch.no_grad():
        weight.mul_(-2.0)  # as a weight sync writes in place
    torch.testing.assert_close(packed.product(x), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert copy.buffer.data_ptr() == buffer
    if form == "panels":
        assert copy.buffer.numel() == 3 * 16 * 16 * 4  # 40 columns in 3 panels of 16, 16 k


@needs_mkl
def test_the_copy_is_refused_for_other_dtypes():
    assert MklPackedCopy(rows_hint=4).product(torch.randn(8, 8, dtype=torch.bfloat16), None) is None
    with pytest.raises(RuntimeError, match="rows_hint"):
        torch.ops.llmrl_kernels.mkl_packed_bytes(0, 8, 8)


@needs_panels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(48, 40), (37, 130), (3072, 576)])
def test_panels_serve_every_row_count(shape, bias):
    """Panels of 16 columns and blocks of 128 k: widths that fill neither (37 columns, 130 k) end
    in a partial panel and a partial block. The plain weight is zeroed after packing for the rows
    the panels serve, so a product that read it would give the bias alone."""
    torch.manual_seed(6)
    out_features, in_features = shape
    weight, b = torch.randn(out_features, in_features), (torch.randn(out_features) if bias else None)
    want_weight = weight.double().clone()
    product = PanelCopy().product(weight, b)
    assert product is not None
    weight.zero_()
    for rows in (0, 1, 2, 5, 6, 7, 12, 13, 29, 31, 32, 33, 47, PANEL_MAX_ROWS):
        x = torch.randn(rows, in_features)
        want = x.double() @ want_weight.T + (b.double() if bias else 0)
        torch.testing.assert_close(product(x).double(), want, atol=1e-4, rtol=1e-5)
    weight.copy_(want_weight)  # above PANEL_MAX_ROWS the plain weight multiplies
    x = torch.randn(PANEL_MAX_ROWS + 1, in_features)
    torch.testing.assert_close(product(x).double(), x.double() @ want_weight.T + (b.double() if bias else 0), atol=1e-4, rtol=1e-5)


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


HEAP_PROBE = """
import ctypes, torch
from llmrl.host_memory import keep_freed_memory
import sys
from llmrl.rollout.packed_copies import MklPackedCopy, PanelCopy
assert keep_freed_memory()
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def malloced():  # bytes malloc hands out now: in use in the heap, and in its own mmaps
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
make = {"mkl": lambda: MklPackedCopy(rows_hint=32), "panels": PanelCopy}[sys.argv[1]]
make().product(torch.randn(8, 8), None)  # loads the kernels, warms the product up
weight = torch.randn(3072, 576)
before = malloced()
plain = torch.empty(weight.numel() * 4, dtype=torch.uint8)  # what torch's packing op allocates
malloc_grew = malloced() - before
del plain
copy = make()
before = malloced()
copy.product(weight, None)
copy_grew = malloced() - before
print(malloc_grew >> 20, copy_grew >> 20, copy.buffer.numel() >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallinfo2 is glibc's")
@pytest.mark.parametrize("form", [pytest.param("mkl", marks=needs_mkl), pytest.param("panels", marks=needs_panels)])
def test_the_copy_is_not_taken_from_malloc(form):
    """A packed copy from malloc landed in the heap's freed chunks between the trainer's buffers;
    this one is a mapping of its own, so malloc's count of bytes handed out does not move."""
    env = {k: v for k, v in os.environ.items() if k != "LLMRL_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, form], capture_output=True, text=True, timeout=300, env=env, check=True)
    malloc_grew, copy_grew, copy_size = (int(v) for v in out.stdout.split()[-3:])
    assert malloc_grew >= 6 and copy_size >= 6 and copy_grew < 1, out.stdout  # MiB
