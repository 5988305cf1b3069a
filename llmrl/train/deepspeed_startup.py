"""Two pieces of DeepSpeed start-up that llmrl never uses, skipped because every rank pays for
them on every start.

- The shared-memory all-reduce op. On a CPU accelerator DeepSpeed's torch backend builds the
  C++ extension `deepspeed_shm_comm` when it joins a group. Only `inference_all_reduce` (tensor
  parallel inference) calls it; training collectives go through torch.distributed. The build is
  a JIT compile keyed to the environment's torch, so each fresh virtual environment's first
  DeepSpeed run compiled it: 55-61 s on a 2-core machine (measured in CI, 2026-12-07). Without
  the op, `inference_all_reduce` falls back to a plain all-reduce.
- Muon's compiled kernel. The ZeRO optimizers import DeepSpeed's Muon module on every run (only
  to test `isinstance(optimizer, MuonWithAuxAdam)`), and that import wraps its Newton-Schulz
  iteration in `torch.compile`, which loads inductor: 2.1 s of every rank's start (measured on
  a 2-core AVX2 host). llmrl's optimizer is AdamW, so the module is imported once with that
  kernel left eager; a later import gets the same module object.
"""
from __future__ import annotations

import importlib
import sys

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_shm_comm_build() -> None:
    """Call before `deepspeed.init_distributed`. Does nothing on a DeepSpeed without the hook. On
    a GPU it applies too (not measured there): there as here, only `inference_all_reduce` would
    use the op, and it falls back to a plain all-reduce without it."""
    # By module name: `import deepspeed.comm.torch as ...` binds the attribute `torch` of
    # deepspeed.comm, which is the torch package itself.
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    if hasattr(torch_backend, "build_shm_op"):
        torch_backend.build_shm_op = lambda: None


def import_muon_uncompiled() -> None:
    """Call before `deepspeed.initialize`. Leaves an already imported Muon module as it is."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    def leave_eager():
        return lambda fn: fn

    compile_factory = compiler.compile
    compiler.compile = leave_eager
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:
        pass  # a DeepSpeed without Muon: nothing to skip
    finally:
        compiler.compile = compile_factory
