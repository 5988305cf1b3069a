"""llmrl: reinforcement-learning post-training of LLMs, one readable loop (llmrl/loop.py) with
parts plugged in from registries (llmrl/registry.py). docs/architecture.md maps the seams."""
import os

__version__ = "0.1.0"

# Transparent huge pages for torch's large CPU buffers (PyTorch reads this once, at the first
# allocation of 2 MB or more, so setting it on import works even after `import torch`). Without
# it every fresh activation, logits chunk and gradient buffer is faulted in 4 KiB at a time:
# a bf16 SmolLM2 update took 11.0M page faults and 40 s of kernel time in 81 s, against 1.0M
# and 28 s with it (docs/benchmarks.md). Set THP_MEM_ALLOC_ENABLE=0 to keep 4 KiB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
