"""Keep the memory torch frees on the CPU inside the process, for the next step to reuse.

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with a fresh
mmap and unmaps it on free, and it trims freed memory off the top of its heap. A training step
on a CPU allocates and frees the same large buffers every micro-batch (activations, logits
chunks, gradients of the tied embedding), so each one came back as new pages: page faults and
kernel time that zeroes them, every step. Measured on a bf16 SmolLM2-135M GRPO update (4 x 8
rows of 184 tokens, 2 AMD EPYC cores): 41k-110k faults and 1.0-2.2 s of kernel time per step
after the first, against none with the settings below (docs/benchmarks.md).

So a process that builds the torch train engine on a CPU tells glibc (mallopt) to serve every
size from its heap and never trim it. Freed memory stays mapped and is reused; the process's
resident size stays at its high-water mark instead of falling between phases. In that process
the peak did not grow (7.01 -> 6.95 GiB for the update alone, 8.07 -> 8.16 GiB for the loop).
It is not applied in DeepSpeed ranks: in a ZeRO-3 rank, whose gathers and partitions vary in
size, the heap fragmented and the peak RSS grew from 4.2 GiB to 5.0-5.5 GiB. Set
LLMRL_KEEP_FREED_MEMORY=0 to keep glibc's defaults (a process that must hand memory back
between phases). Other C libraries (musl) are left alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from typing import Iterator

ENV = "LLMRL_KEEP_FREED_MEMORY"
# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's default M_MMAP_MAX, and the size from which `own_mappings` maps a buffer of its own
DEFAULT_MMAP_MAX = 65536
OWN_MAPPING_BYTES = 1 << 20
# "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt(3)).
NEVER_TRIM = -1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process unless LLMRL_KEEP_FREED_MEMORY=0; True where they are
    in force (glibc accepted both), False where they were not applied."""
    global _applied
    if _applied is None:
        _applied = os.environ.get(ENV, "1") != "0" and _mallopt_keep()
    return _applied


def _mallopt_keep() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. No mmap'd chunks: every size comes from the heap, where a
    # free leaves the pages mapped for the next request.
    global _mallopt
    _mallopt = mallopt
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


_mallopt = None


@contextlib.contextmanager
def own_mappings() -> Iterator[None]:
    """Inside the block, a buffer of OWN_MAPPING_BYTES or more gets a mapping of its own, which
    goes back to the kernel when it is freed, also where `keep_freed_memory` is in force.

    For long-lived buffers replaced now and then while a step's short-lived ones come and go:
    the rollout engine's packed weights, made again after every weight sync. From the heap, each
    new set took fresh pages while the trainer's allocations split the freed ones, and the
    quickstart's peak RSS grew by about 120 MB a step (docs/benchmarks.md)."""
    if _mallopt is None or not keep_freed_memory():
        yield
        return
    _mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_BYTES)
    _mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    try:
        yield
    finally:
        _mallopt(M_MMAP_MAX, 0)  # back to the heap only; a mapped chunk is unmapped when freed, whatever the settings
