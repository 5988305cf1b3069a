"""CPU kernels of our own, compiled on first use and cached per machine.

The sources sit beside this file. A library's sources (LIBRARIES) are compiled side by side, one
compiler process each, and linked once with the system's C++ compiler against the installed
torch, into `$LLMRL_KERNEL_CACHE` (default `~/.cache/llmrl/kernels`), under a name
that hashes the source, the compile command, the torch version and this CPU's flags, so an
edit, an upgrade or another machine gets a fresh build. The library is written to a temporary name and renamed into
place, so a build killed half-way leaves nothing that a later run would load, and two processes
building at once both end with a whole file. Where no compiler works, callers fall back to
torch's own operators; the reason is logged once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from llmrl.kernel_cache import CACHE_ENV, cache_dir
from llmrl.precision import cpu_field

logger = logging.getLogger("llmrl.kernels")

SOURCES = Path(__file__).resolve().parent
DECODE = "decode"
# library -> its compiled sources. "decode": attention over a shared prompt cache, the elementwise
# steps of a Llama-family decoder layer (decode, and training's norms and SiLU), MKL's packed GEMM
# and the sampler (one build, so a first run waits for one). elementwise_ops.cpp includes the
# other sources: most of a source's compile is parsing torch's headers (6 s of each one's 8 s on
# 2 cores here), so they parse them once, while shared_prefix_decode.cpp, the longest, compiles
# beside them (build 15.3 -> 11.0 s).
LIBRARIES: dict[str, tuple[str, ...]] = {DECODE: ("shared_prefix_decode.cpp", "elementwise_ops.cpp")}
BUILD_TIMEOUT_S = 600

_LOCK = threading.Lock()
_LOADED: dict[str, bool] = {}
_FAILURES: dict[str, str] = {}


def _cpu_flags() -> str:
    return cpu_field("flags") or platform.processor()


def _flags() -> tuple[str, list[str], list[str]]:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libraries = [f"-L{p}" for p in cpp_extension.library_paths()] + [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # -march=native: the build is for this machine only (its CPU flags are in the cache name).
    # -fopenmp: at::parallel_for is inline OpenMP; without the flag it runs on one thread.
    # -fno-tree-loop-distribute-patterns: else gcc turns the loads of an fp32 row into registers
    # into a memcpy call per key.
    # -ffp-contract=off: no fused multiply-adds where the source has none, so the elementwise ops
    # round as torch's do (explicit FMA intrinsics are unaffected).
    # -fno-trapping-math: no code here reads floating-point exception flags, and without it gcc 12
    # will not turn the clamps in exp (x < lo ? lo : x) into vector min/max, so every loop that
    # calls exp stayed scalar (4x slower SiLU on an AVX2 host). No result changes.
    compile_flags = [
        "-O3", "-march=native", "-fopenmp", "-fno-tree-loop-distribute-patterns", "-ffp-contract=off", "-fno-trapping-math",
        "-std=c++17", "-fPIC", abi, *includes,
    ]
    return compiler, compile_flags, [*libraries, "-lc10", "-ltorch_cpu", "-ltorch"]


def _build_commands(name: str, directory: Path, target: Path) -> tuple[list[list[str]], list[str]]:
    """One compile command per source of library `name`, objects into `directory`, and the link
    command that makes `target` of them."""
    compiler, compile_flags, link_flags = _flags()
    objects = [directory / f"{Path(source).stem}.o" for source in LIBRARIES[name]]
    compiles = [[compiler, *compile_flags, "-c", str(SOURCES / source), "-o", str(obj)] for source, obj in zip(LIBRARIES[name], objects)]
    return compiles, [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(target), *link_flags]


def _library_path(name: str) -> Path:
    digest = hashlib.sha256()
    compiles, link = _build_commands(name, Path("obj"), Path("out.so"))
    # every source and header beside this file, included ones too: an edit rebuilds
    for source in sorted(p.name for p in [*SOURCES.glob("*.cpp"), *SOURCES.glob("*.h")]):
        digest.update((SOURCES / source).read_bytes())
    flags = " ".join(" ".join(command) for command in [*compiles, link])
    for part in (flags.encode(), torch.__version__.encode(), _cpu_flags().encode(), sys.version.encode()):
        digest.update(part)
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"


def _build(name: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        compiles, link = _build_commands(name, Path(scratch), partial)
        # stderr, not the log: nothing else shows during these seconds, and logging may be off
        print(f"llmrl: building the {name} kernels into {library.parent} (once per machine)...", file=sys.stderr, flush=True)
        start = time.monotonic()
        # the sources compile side by side: most of each one's time is parsing torch's headers
        running = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for command in compiles]
        try:
            outcomes = [(command, process, process.communicate(timeout=BUILD_TIMEOUT_S)[1]) for command, process in zip(compiles, running)]
        finally:
            for process in running:
                if process.poll() is None:
                    process.kill()
        for command, process, errors in outcomes:
            if process.returncode != 0:
                raise RuntimeError(f"{command[0]} exited {process.returncode} on {Path(command[-3]).name}: {errors.strip()[-2000:]}")
        done = subprocess.run(link, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{link[0]} exited {done.returncode} linking {name}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
        print(f"llmrl: built the {name} kernels in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def load(name: str) -> bool:
    """Build (if needed) and load kernel library `name`, registering its `torch.ops.llmrl_kernels`
    operators. False, with the reason logged once, where that cannot be done here."""
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        try:
            library = _library_path(name)
            if not library.exists():
                _build(name, library)
            torch.ops.load_library(str(library))
            _LOADED[name] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _FAILURES[name] = str(error)
            logger.warning("kernel %s unavailable, falling back to torch's operators: %s", name, str(error).splitlines()[0][:300])
            _LOADED[name] = False
        return _LOADED[name]


def failure(name: str) -> str | None:
    """Why `load(name)` returned False, if it did."""
    return _FAILURES.get(name)
