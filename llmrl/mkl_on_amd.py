"""MKL's tuned GEMM kernels on AMD CPUs, by answering its vendor check.

torch's x86 wheels link Intel's MKL statically, and MKL picks its GEMM kernels by CPU vendor: on
an AMD CPU it takes a slower path even where the cores have the AVX2 and FMA units its Intel
kernels are written for. On 2 Zen 2 cores (AVX2, no AVX-512) torch's fp32 2048 x 2048 product
ran at 128-141 GFLOP/s, and at 168-184 GFLOP/s with MKL told the CPU is Intel's; the cores' FMA
units top out at 206 GFLOP/s (a register-only FMA loop) and OpenBLAS reached 178. An update of
SmolLM2-135M on 32 rows of 240 tokens took 31.9 s against 25.3 s (docs/benchmarks.md).

The check is `mkl_serv_intel_cpu_true`, a symbol torch's library exports, so a shared library
that defines it and is named in LD_PRELOAD is bound ahead of MKL's own. LD_PRELOAD is read only
when a process starts: `llmrl` (the console command) re-executes itself once with it set, before
torch is imported, and every process it starts inherits it. Results are as accurate as before
(the Intel kernels' rounding differs in the last bits, so runs with and without it part after a
while, as runs on two kinds of CPU do).

LLMRL_MKL_KERNELS=vendor keeps MKL's own choice; the default `auto` preloads on AMD x86-64 CPUs
under Linux where a C compiler builds the two-line library (cached beside llmrl's kernels).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, MutableMapping

from llmrl.cpu_info import cpu_field

SWITCH_ENV = "LLMRL_MKL_KERNELS"
CHOICES = ("auto", "vendor")
# Set in the re-executed process, so that a failed preload never turns into an exec loop.
REEXEC_MARK = "LLMRL_MKL_REEXEC"
SOURCE = "/* llmrl: MKL's vendor check answered 'Intel' (llmrl/mkl_on_amd.py) */\nint mkl_serv_intel_cpu_true(void) { return 1; }\n"
LIBRARY_STEM = "libllmrl_mkl_intel_path"


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this machine should get the preload: an AMD x86-64 CPU under Linux, unless
    LLMRL_MKL_KERNELS=vendor. Any other value than the two choices is a user error."""
    choice = environ.get(SWITCH_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{SWITCH_ENV}={environ[SWITCH_ENV]!r}: expected one of {', '.join(CHOICES)}")
    if choice == "vendor":
        return False
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64") and cpu_field("vendor_id") == "AuthenticAMD"


def library_path() -> Path | None:
    """The preload library, built on first use into llmrl's kernel cache; None where no C
    compiler builds it."""
    from llmrl.kernel_cache import cache_dir  # no torch import: this runs before torch loads

    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    target = cache_dir() / f"{LIBRARY_STEM}-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source = Path(tmp) / "mkl_intel_path.c"
            source.write_text(SOURCE)
            built = Path(tmp) / target.name
            subprocess.run([compiler, "-shared", "-fPIC", "-O2", str(source), "-o", str(built)],
                           check=True, capture_output=True, timeout=60)
            os.replace(built, target)  # whole or absent: a build killed half-way leaves nothing
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def _preloads(environ: Mapping[str, str]) -> list[str]:
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()  # ld.so splits on both


def _is_ours(entry: str) -> bool:
    return Path(entry).name.startswith(LIBRARY_STEM)


def in_effect(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process started with the preload."""
    return any(_is_ours(p) for p in _preloads(environ))


def with_preload(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus the preload where this machine wants it (for a child process); unchanged
    where it does not, or where the library cannot be built."""
    env = dict(environ)
    if in_effect(env) or not wanted(env):
        return env
    library = library_path()
    # LD_PRELOAD splits on spaces and colons: a cache path with either cannot be named in it.
    if library is not None and not any(c in str(library) for c in " :"):
        env["LD_PRELOAD"] = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    return env


def without_preload(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with llmrl's preload taken out of LD_PRELOAD (MKL's own kernel choice)."""
    env = dict(environ)
    kept = [p for p in _preloads(env) if not _is_ours(p)]
    if kept:
        env["LD_PRELOAD"] = " ".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def reexec_with_preload(environ: MutableMapping[str, str] = os.environ) -> None:
    """Start this command again with the preload, if this machine wants it and the process did
    not start with it. Returns only where nothing is to be done (or the exec failed)."""
    if REEXEC_MARK in environ or in_effect(environ) or "torch" in sys.modules:
        return
    env = with_preload(environ)
    if not in_effect(env):
        return
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:
        return
