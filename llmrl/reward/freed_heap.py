"""Put the malloc heap a forked reward worker inherits out of its reach, so that the worker's
address-space limit counts every byte it uses.

`RLIMIT_AS` caps new mappings. A fork starts with its parent's heap, and memory the parent freed
but kept mapped (llmrl's trainer keeps all of it: `llmrl/host_memory.py`) can be handed out
again by malloc without a new mapping, so the limit would not see it: a reward forked from a
trainer with 5 GiB freed took 4 GiB past a 256 MiB limit. A worker fork is single-threaded, so it
can claim that memory itself first: with the soft limit at its present size no request can map
anything, and every malloc that still succeeds is served from the inherited free memory. The
claimed blocks are never written, so the pages stay shared with the trainer (or unbacked), and
never freed, so the reward cannot get them back.
"""
from __future__ import annotations

import ctypes
import resource

# Requests start above any heap and halve. Fragments below the smallest request stay reusable
# (with other threads' arenas, 230 MB stayed free in a test process after 900 tests): each would
# cost a call and a copied page (the next chunk's header is written) to claim.
_FIRST_REQUEST = 1 << 40
_SMALLEST_REQUEST = 1 << 16
_MAX_CALLS = 1 << 16


def address_space() -> int:
    """This process's mapped address space in bytes (VmSize), 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def claim_freed_heap() -> int:
    """Allocate, without touching, what malloc can serve with no new mapping; return the bytes
    claimed. Call it only in a single-threaded process that will not need that memory (another
    thread's malloc would also fail while the soft limit is down)."""
    try:
        malloc = ctypes.CDLL(None).malloc
    except (OSError, AttributeError):
        return 0
    malloc.argtypes = [ctypes.c_size_t]
    malloc.restype = ctypes.c_void_p
    size_now = address_space()
    if size_now == 0:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_now if hard == resource.RLIM_INFINITY else min(size_now, hard), hard))
    claimed, request, calls = 0, _FIRST_REQUEST, 0
    try:
        while request >= _SMALLEST_REQUEST and calls < _MAX_CALLS:
            calls += 1
            if malloc(request):
                claimed += request
            else:
                request >>= 1
    except MemoryError:  # Python itself could not allocate with the limit down: stop claiming
        pass
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return claimed
