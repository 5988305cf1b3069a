"""Fields of /proc/cpuinfo. Kept free of torch, so a process can read them before torch loads
(llmrl/mkl_on_amd.py decides on a restart from the CPU's vendor)."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_field(name: str) -> str:
    """The value of the first `name` line of /proc/cpuinfo ("vendor_id", "flags"), or "" where the
    file or the field is missing (not Linux, or an architecture that names it otherwise)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""
