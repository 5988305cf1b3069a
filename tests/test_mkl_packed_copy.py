"""MKL's packed copy of an fp32 decode weight in a mapping of its own: packed again in place, and
never taken from malloc (its products for every row count: tests/test_packed_linears.py)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from llmrl.rollout import packed_linears
from llmrl.rollout.mkl_packed_copy import MklPackedCopy, mkl_packing_ops_here
from llmrl.rollout.packed_linears import PackedWeight

pytestmark = pytest.mark.skipif(not mkl_packing_ops_here(), reason="llmrl's kernels or this torch's MKL packed GEMM are missing")


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


def test_packed_weight_takes_the_copy_where_mkl_runs_its_intel_kernels_and_repacks_after_a_write(monkeypatch):
    monkeypatch.setattr(packed_linears, "mkl_takes_intel_kernels", lambda: True)
    torch.manual_seed(5)
    weight, bias = torch.randn(40, 16), torch.randn(40)
    packed = PackedWeight(weight, bias, pack=True, rows_hint=4)
    x = torch.randn(4, 16)
    torch.testing.assert_close(packed.product(x), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    buffer = packed._mkl_copy.buffer.data_ptr()
    with torch.no_grad():
        weight.mul_(-2.0)  # as a weight sync writes in place
    torch.testing.assert_close(packed.product(x), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert packed._mkl_copy.buffer.data_ptr() == buffer


def test_the_copy_is_refused_for_other_dtypes():
    assert MklPackedCopy(rows_hint=4).product(torch.randn(8, 8, dtype=torch.bfloat16), None) is None
    with pytest.raises(RuntimeError, match="rows_hint"):
        torch.ops.llmrl_kernels.mkl_packed_bytes(0, 8, 8)


HEAP_PROBE = """
import ctypes, torch
from llmrl.host_memory import keep_freed_memory
from llmrl.rollout.mkl_packed_copy import MklPackedCopy
assert keep_freed_memory()
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def malloced():  # bytes malloc hands out now: in use in the heap, and in its own mmaps
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
MklPackedCopy(rows_hint=32).product(torch.randn(8, 8), None)  # loads the kernels, warms MKL up
weight = torch.randn(3072, 576)
before = malloced()
plain = torch.empty(weight.numel() * 4, dtype=torch.uint8)  # what torch's packing op allocates
malloc_grew = malloced() - before
del plain
copy = MklPackedCopy(rows_hint=32)
before = malloced()
copy.product(weight, None)
copy_grew = malloced() - before
print(malloc_grew >> 20, copy_grew >> 20, copy.buffer.numel() >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallinfo2 is glibc's")
def test_the_copy_is_not_taken_from_malloc():
    """A packed copy from malloc landed in the heap's freed chunks between the trainer's buffers;
    this one is a mapping of its own, so malloc's count of bytes handed out does not move."""
    env = {k: v for k, v in os.environ.items() if k != "LLMRL_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=300, env=env, check=True)
    malloc_grew, copy_grew, copy_size = (int(v) for v in out.stdout.split()[-3:])
    assert malloc_grew >= 6 and copy_size >= 6 and copy_grew < 1, out.stdout  # MiB
