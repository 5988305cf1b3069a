"""CPU kernels of our own, compiled on first use and cached per machine.

The sources sit beside this file. Each is built once with the system's C++ compiler against the
installed torch, into `$LLMRL_KERNEL_CACHE` (default `~/.cache/llmrl/kernels`), under a name
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

from llmrl.precision import cpu_field

logger = logging.getLogger("llmrl.kernels")

SOURCES = Path(__file__).resolve().parent
SHARED_PREFIX_DECODE = "shared_prefix_decode"  # decode attention over a shared prompt cache
CACHE_ENV = "LLMRL_KERNEL_CACHE"
BUILD_TIMEOUT_S = 600

_LOCK = threading.Lock()
_LOADED: dict[str, bool] = {}
_FAILURES: dict[str, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmrl" / "kernels")


def _cpu_flags() -> str:
    return cpu_field("flags") or platform.processor()


def _compile_command(source: Path, target: Path) -> list[str]:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libraries = [f"-L{p}" for p in cpp_extension.library_paths()] + [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # -march=native: the build is for this machine only (its CPU flags are in the cache name).
    # -fopenmp: at::parallel_for is inline OpenMP; without the flag it runs on one thread.
    # -fno-tree-loop-distribute-patterns: else gcc turns the loads of an fp32 row into registers
    # into a memcpy call per key.
    return [compiler, "-O3", "-march=native", "-fopenmp", "-fno-tree-loop-distribute-patterns", "-std=c++17", "-fPIC", "-shared", abi, *includes, str(source),
            "-o", str(target), *libraries, "-lc10", "-ltorch_cpu", "-ltorch"]


def _library_path(name: str) -> Path:
    source = SOURCES / f"{name}.cpp"
    digest = hashlib.sha256()
    flags = " ".join(_compile_command(source, Path("out.so")))
    for part in (source.read_bytes(), flags.encode(), torch.__version__.encode(), _cpu_flags().encode(), sys.version.encode()):
        digest.update(part)
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"


def _build(name: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        command = _compile_command(SOURCES / f"{name}.cpp", partial)
        # stderr, not the log: nothing else shows during these seconds, and logging may be off
        print(f"llmrl: building the {name} kernel into {library.parent} (once per machine)...", file=sys.stderr, flush=True)
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
        print(f"llmrl: built the {name} kernel in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


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
