"""Where llmrl's compiled CPU kernels are cached: `$LLMRL_KERNEL_CACHE`, default
`~/.cache/llmrl/kernels`. Kept free of torch, so a process can find it before torch loads."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LLMRL_KERNEL_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmrl" / "kernels")
