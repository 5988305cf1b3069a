"""Which precision is fast on this machine.

bf16 autocast with fp32 master weights is the default where the hardware has native bf16
matmuls (CUDA, or CPUs with AVX512-BF16 / AMX). Elsewhere bf16 is emulated: measured on an
AVX2-only CPU, a 2048^2 bf16 matmul ran at 0.3 GFLOP/s against 81 GFLOP/s in fp32. So "auto"
resolves to fp32 there.
"""
from __future__ import annotations

import functools

import torch

from llmrl.cpu_info import cpu_field  # noqa: F401  (re-exported: callers import it from here)

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    flags = set(cpu_field("flags").split())
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def bf16_is_fast() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(name: str) -> str:
    """'auto' -> 'bf16' or 'fp32'; other names pass through."""
    if name == "auto":
        return "bf16" if bf16_is_fast() else "fp32"
    return name


def resolve_dtype(name: str) -> torch.dtype:
    """Weights dtype for inference copies: 'auto' follows the hardware."""
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[
        resolve_precision(name)
    ]
