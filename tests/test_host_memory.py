"""The torch train engine on a CPU keeps freed memory in the process (llmrl/host_memory.py)."""
import os
import platform
import subprocess
import sys

import pytest

# Twenty fresh 64 MB buffers, every page touched, one after another; 4 KiB pages so that the
# count of faults is the count of pages the kernel had to hand out. Printed: whether the setting
# is in force, the faults of the first buffer, and those of the last ten.
PROBE = """
import resource, torch
import llmrl
from llmrl.host_memory import keep_freed_memory
applied = keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for i in range(20):
    x = torch.ones(64 << 20, dtype=torch.uint8)
    del x
    if i == 0:
        first = faults() - start
    if i == 9:
        middle = faults()
print(applied, first, faults() - middle)
"""


def probe(setting: str | None) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "LLMRL_KEEP_FREED_MEMORY"}
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    if setting is not None:
        env["LLMRL_KEEP_FREED_MEMORY"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env, check=True)
    applied, first, rest = out.stdout.split()
    return applied, int(first), int(rest)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_freed_buffers_are_reused_without_new_page_faults():
    applied, first, rest = probe(None)
    assert applied == "True"
    # 64 MB is about 16k pages: the first buffers fault them in (with 64-byte alignment glibc may
    # place a few buffers side by side before a freed run fits), the last ten reuse them.
    assert first > 10_000, first
    assert rest < first // 10, (first, rest)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_the_user_can_keep_glibc_defaults():
    applied, first, rest = probe("0")
    assert applied == "False"
    # glibc maps each 64 MB buffer afresh and unmaps it on free: each of the last ten faults again.
    assert rest > 5 * first, (first, rest)


def test_importing_llmrl_leaves_malloc_alone_and_the_torch_engine_applies_it():
    code = (
        "import llmrl, llmrl.host_memory as m; before = m._applied\n"
        "from llmrl.models import ModelConfig, load_policy\n"
        "from llmrl.train.engine import TrainConfig\n"
        "from llmrl.train.torch_engine import TorchTrainEngine\n"
        "TorchTrainEngine(load_policy(ModelConfig(name='tiny')), TrainConfig(), total_updates=1)\n"
        "print(before, m._applied)"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLMRL_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=True)
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert out.stdout.split()[-2:] == ["None", expected], out.stdout


OWN_MAPPING_PROBE = """
import torch
from llmrl.host_memory import keep_freed_memory, own_mappings
assert keep_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def grows_by(inside):
    before = rss()
    if inside:
        with own_mappings():
            x = torch.ones(256 << 20, dtype=torch.uint8)
    else:
        x = torch.ones(256 << 20, dtype=torch.uint8)
    del x
    return rss() - before
print(grows_by(True), grows_by(False))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_a_buffer_made_in_own_mappings_goes_back_when_freed_and_one_from_the_heap_stays():
    env = {k: v for k, v in os.environ.items() if k != "LLMRL_KEEP_FREED_MEMORY"}
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", OWN_MAPPING_PROBE], capture_output=True, text=True, timeout=120, env=env, check=True)
    inside, outside = (int(v) for v in out.stdout.split())
    assert inside < 16 and outside >= 240, (inside, outside)  # MB left resident after a 256 MB buffer is freed
