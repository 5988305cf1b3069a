"""Importing llmrl puts torch's large CPU buffers on transparent huge pages (llmrl/__init__.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import resource, torch
import llmrl, os
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(64 << 20, dtype=torch.uint8)  # a fresh 64 MB buffer, every page touched
    del x
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(env_value: str | None) -> tuple[str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["LLMRL_KEEP_FREED_MEMORY"] = "0"  # each fresh buffer must come from the kernel, as measured
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env, check=True)
    setting, faults = out.stdout.split()
    return setting, int(faults)


def test_import_turns_huge_pages_on_unless_the_user_chose():
    assert probe(None)[0] == "1"
    assert probe("0")[0] == "0"  # the user's choice stands


def test_huge_pages_cut_the_page_faults_of_large_buffers():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    _, with_thp = probe(None)
    _, without = probe("0")
    # 640 MB in 4 KiB pages is about 160k faults; in 2 MB pages, a few hundred plus the rest
    assert without > 100_000 and with_thp * 5 < without, (with_thp, without)
