"""The decode attention kernel with its KV cache warm in the CPU's caches, and cold.

In a decode step the `hf` engine calls llmrl's decode attention (`shared_prefix_decode`) once
per layer, and between two calls for the same layer every weight of the model streams through
the caches: each call finds its keys and values in memory, not in cache. This bench times the
kernel both ways at the vs_trl shape (4 prompts x 8 samples, 115 prompt tokens, SmolLM2-135M's
3 KV heads of 64 with 3 query heads each): warm, one layer's tensors called 30 times over; cold,
30 layers' distinct tensors called once each right after a pass over a 256 MB buffer. Both
alternate over --rounds; the median microseconds per call are printed for each number of
generated keys, with cold / warm.

    .venv/bin/python bench/decode_attention_cache.py                 # fp32 and, where native, bf16
    .venv/bin/python bench/decode_attention_cache.py --lengths 64 --rounds 6
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llmrl
from llmrl.mkl_on_amd import reexec_with_preload  # noqa: E402

reexec_with_preload()  # the process as `llmrl` runs it (the kernel is llmrl's; the rest of the process is MKL's)

import torch  # noqa: E402
from machine import machine_header, native_bf16  # noqa: E402  (bench/machine.py)

ROWS, PROMPTS, KV_HEADS, GROUPS, HEAD, PROMPT_TOKENS, LAYERS = 32, 4, 3, 3, 64, 115, 30


def layer_tensors(dtype: torch.dtype, generated: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One layer's query, prompt cache and own cache (a view of `generated` of 128 slots, as the engine's)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    own_k, own_v = randn(ROWS, KV_HEADS, 128, HEAD), randn(ROWS, KV_HEADS, 128, HEAD)
    return (randn(ROWS, KV_HEADS, GROUPS, HEAD), randn(PROMPTS, KV_HEADS, PROMPT_TOKENS, HEAD),
            randn(PROMPTS, KV_HEADS, PROMPT_TOKENS, HEAD), own_k[:, :, :generated], own_v[:, :, :generated])


def time_calls(layers: list[tuple[torch.Tensor, ...]], row_prompt: torch.Tensor) -> float:
    attend = torch.ops.llmrl_kernels.shared_prefix_decode
    start = time.perf_counter()
    for query, prefix_k, prefix_v, own_k, own_v in layers:
        attend(query, prefix_k, prefix_v, None, row_prompt, own_k, own_v, HEAD**-0.5)
    return (time.perf_counter() - start) / len(layers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 120], help="generated keys per row")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 (default: bf16 only where native)")
    args = parser.parse_args()

    from llmrl import kernels
    from llmrl.host_memory import keep_freed_memory

    keep_freed_memory()
    if not kernels.load(kernels.DECODE):
        print("llmrl's kernels did not build here; nothing to time")
        return 1
    print(machine_header())
    dtypes = args.dtypes or ["float32", *(["bfloat16"] if native_bf16() else [])]
    row_prompt = torch.arange(ROWS) // (ROWS // PROMPTS)
    evict = torch.zeros(64 << 20)  # 256 MB: more than any L3 here
    print(f"{'dtype':>9} {'generated':>9} {'warm_us':>8} {'cold_us':>8} {'cold/warm':>9}")
    for name in dtypes:
        dtype = getattr(torch, name)
        for generated in args.lengths:
            g = torch.Generator().manual_seed(0)
            layers = [layer_tensors(dtype, generated, g) for _ in range(LAYERS)]
            warm, cold = [], []
            for _ in range(args.rounds):
                time_calls(layers[:1] * 2, row_prompt)
                warm.append(time_calls(layers[:1] * LAYERS, row_prompt))
                evict.add_(1.0)
                cold.append(time_calls(layers, row_prompt))
            skip = min(2, args.rounds - 1)  # the first rounds fault pages in
            w, c = statistics.median(warm[skip:]) * 1e6, statistics.median(cold[skip:]) * 1e6
            print(f"{name:>9} {generated:>9} {w:>8.1f} {c:>8.1f} {c / w:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
