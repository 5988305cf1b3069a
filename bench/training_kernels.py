"""llmrl's training kernels against torch's ops, side by side in one process: attention in tiles
(llmrl/kernels/softmax_products.cpp) and the head pass's elementwise work (llmrl/kernels/head_ops.cpp).

Shapes are the vs_trl ones (SmolLM2-135M, 4 prompts x 8 samples, micro-batches of 16 rows):
- attention: one layer's forward and backward over the packed pass's grid, 19 rows (a shared start,
  2 prompts, 16 responses of 100-129 tokens) x 3 KV heads x 387 grouped queries over 241 keys;
- head: the chunked logprob-and-entropy pass over 2,032 response tokens and a 49,152-word vocabulary,
  forward and backward (its lm_head products included: they are the same on both sides).
llmrl's path and torch's ops alternate over --rounds; the medians are printed with their ratio.

    .venv/bin/python bench/training_kernels.py            # fp32 and, where native, bf16
    .venv/bin/python bench/training_kernels.py --rounds 9
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llmrl
from llmrl.mkl_on_amd import reexec_with_preload  # noqa: E402

reexec_with_preload()  # the process as `llmrl` runs it

import torch  # noqa: E402
from machine import machine_header, native_bf16  # noqa: E402  (bench/machine.py)

from llmrl.host_memory import keep_freed_memory  # noqa: E402
import llmrl.materialized_attention as materialized  # noqa: E402
import llmrl.train.logprobs as logprobs  # noqa: E402


def attention_case(dtype: torch.dtype) -> Callable[[], None]:
    root, width, own, groups, grid_rows = 24, 88, 129, 3, 19
    keys = root + width + own
    g = torch.Generator().manual_seed(0)
    attend = torch.zeros(grid_rows, 1, own, keys, dtype=torch.bool)
    causal = torch.ones(own, own, dtype=torch.bool).tril()
    attend[0, 0, :, root + width :] = causal & (torch.arange(own) < root)[None]  # the shared start
    for row in (1, 2):  # the prompts
        attend[row, 0, :, :root] = True
        attend[row, 0, :, root + width :] = causal & (torch.arange(own) < 70)[None]
    for row in range(3, grid_rows):  # the responses
        length, prompt = int(torch.randint(100, 130, (1,), generator=g)), int(torch.randint(60, 89, (1,), generator=g))
        attend[row, 0, :, :root] = True
        attend[row, 0, :, root : root + prompt] = True
        attend[row, 0, :, root + width :] = causal & (torch.arange(own) < length)[None]
    mask = attend.repeat(1, 1, groups, 1)
    q = torch.randn(grid_rows, own, 9, 64, generator=g).to(dtype).transpose(1, 2).reshape(grid_rows, 3, groups * own, 64)
    k, v = (torch.randn(grid_rows, 3, keys, 64, generator=g).to(dtype) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad = torch.randn(q.shape, generator=g).to(dtype)

    def run() -> None:
        materialized.materialized_attention(q, k, v, mask, 0.125, row_period=own).backward(grad)

    return run


def head_case(dtype: torch.dtype) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 130, 576, generator=g).requires_grad_()
    weight = (0.05 * torch.randn(49152, 576, generator=g)).requires_grad_()
    ids = torch.randint(0, 49152, (16, 130), generator=g)
    only = torch.ones(16, 130, dtype=torch.bool)
    only[:, :3] = False
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run() -> None:
        with autocast:
            logp, _ = logprobs.token_logprobs(hidden, weight, ids, 1.0, True, only=only, entropy_grad=False)
        logp.sum().backward()

    return run


def torch_ops(name: str) -> Callable[[], None]:
    """Switch the case's path to torch's ops; returns the switch back."""
    attribute, module = ("_fused_softmax", materialized) if name == "attention" else ("_row_kernels", logprobs)
    original = getattr(module, attribute)
    setattr(module, attribute, lambda *args: False)
    return lambda: setattr(module, attribute, original)


def median_seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # the first call sizes buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of llmrl's path and torch's ops")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path and round (attention: 4x as many)")
    args = parser.parse_args()
    keep_freed_memory()
    print(machine_header())
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    print(f"{'case':<10} {'dtype':<9} {'llmrl ms':>9} {'torch ops ms':>13} {'speedup':>8}")
    for dtype in dtypes:
        for name, build, repeats in (("attention", attention_case, 4 * args.repeats), ("head", head_case, args.repeats)):
            run = build(dtype)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(median_seconds(run, repeats))
                restore = torch_ops(name)
                try:
                    theirs.append(median_seconds(run, repeats))
                finally:
                    restore()
            a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
            print(f"{name:<10} {str(dtype).removeprefix('torch.'):<9} {a:>9.2f} {b:>13.2f} {b / a:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
