"""One layer's decode attention over a shared prompt cache: torch's fused kernel against llmrl's.

The `hf` engine decodes a GRPO group's samples over one copy of their prompt's keys and values
(llmrl/rollout/shared_prefix_cache.py). Per layer and decode step it either makes two calls of
torch's fused CPU attention (prompt part, own part) and merges them by log-sum-exp, or one call of
llmrl's kernel (llmrl/kernels/shared_prefix_decode.cpp). This bench times both on the same
inputs, shaped like SmolLM2-135M's (3 KV heads of 64, 9 query heads), alternating over rounds,
and prints each one's largest difference from fp64 attention over the concatenated keys.

    .venv/bin/python bench/decode_kernel.py                          # bf16 and fp32, 64 rows
    .venv/bin/python bench/decode_kernel.py --rows 32 --lengths 1,64  # other shapes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llmrl
from machine import machine_header  # noqa: E402  (bench/machine.py)

from llmrl import kernels  # noqa: E402  (needs only torch: this bench also runs on a bare GPU box)

KERNEL = kernels.DECODE


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """torch's fused CPU attention with each query's log-sum-exp, as llmrl/rollout/shared_prefix_cache.py calls it."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=mask, scale=scale)


def inputs(dtype: torch.dtype, prompts: int, per_prompt: int, width: int, length: int, pad: int, kv_heads: int = 3,
           groups: int = 3, dim: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = prompts * per_prompt
    valid = torch.ones(prompts, width, dtype=torch.bool)
    for p in range(prompts):
        valid[p, : p % (pad + 1)] = False  # left padding, as the engine's prefill has
    room = length + 64  # own keys are the filled part of a longer buffer, as in the engine's cache
    return {
        "query": torch.randn(rows, kv_heads, groups, dim, generator=g).to(dtype),
        "prefix_keys": torch.randn(prompts, width, kv_heads, dim, generator=g).to(dtype).transpose(1, 2),
        "prefix_values": torch.randn(prompts, width, kv_heads, dim, generator=g).to(dtype).transpose(1, 2),
        "valid": valid,
        "row_prompt": torch.arange(rows) // per_prompt,
        "suffix_keys": torch.randn(rows, kv_heads, room, dim, generator=g).to(dtype)[:, :, :length],
        "suffix_values": torch.randn(rows, kv_heads, room, dim, generator=g).to(dtype)[:, :, :length],
        "scale": dim**-0.5,
        "per_prompt": per_prompt,
    }


def torch_fused(x: dict) -> torch.Tensor:
    """What SharedPrefixCache.attend does without the kernel (rows in slot order)."""
    q, prompts = x["query"], x["prefix_keys"].shape[0]
    rows, kv_heads, groups, dim = q.shape
    per = x["per_prompt"]
    mask = torch.zeros(x["valid"].shape, dtype=q.dtype).masked_fill_(~x["valid"], float("-inf"))[:, None, None, :]
    prefix_q = q.view(prompts, per, kv_heads, groups, dim).transpose(1, 2).reshape(prompts, kv_heads, per * groups, dim)
    prefix_out, prefix_lse = _flash(prefix_q, x["prefix_keys"], x["prefix_values"], mask, x["scale"])
    prefix_out = prefix_out.reshape(prompts, kv_heads, per, groups, dim).transpose(1, 2).reshape(rows, kv_heads, groups, dim)
    prefix_lse = prefix_lse.reshape(prompts, kv_heads, per, groups).transpose(1, 2).reshape(rows, kv_heads, groups)
    suffix_out, suffix_lse = _flash(q, x["suffix_keys"], x["suffix_values"], None, x["scale"])
    weight = torch.sigmoid(prefix_lse - suffix_lse).unsqueeze(-1)
    return torch.lerp(suffix_out.float(), prefix_out.float(), weight).to(q.dtype)


def llmrl_kernel(x: dict) -> torch.Tensor:
    return torch.ops.llmrl_kernels.shared_prefix_decode(
        x["query"], x["prefix_keys"], x["prefix_values"], x["valid"], x["row_prompt"], x["suffix_keys"], x["suffix_values"], x["scale"]
    )


def exact(x: dict) -> torch.Tensor:
    out = torch.empty(x["query"].shape, dtype=torch.float64)
    for b in range(out.shape[0]):
        p = int(x["row_prompt"][b])
        seen = x["valid"][p]
        keys = torch.cat([x["prefix_keys"][p][:, seen], x["suffix_keys"][b]], dim=1).double()
        values = torch.cat([x["prefix_values"][p][:, seen], x["suffix_values"][b]], dim=1).double()
        out[b] = torch.softmax(x["query"][b].double() @ keys.transpose(-1, -2) * x["scale"], dim=-1) @ values
    return out


def per_call_us(fn, x: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="rows in all (prompts x samples per prompt)")
    parser.add_argument("--width", type=int, default=56, help="prompt tokens (the prefill's width)")
    parser.add_argument("--pad", type=int, default=6, help="up to this many padding slots per prompt")
    parser.add_argument("--lengths", default="1,16,64,128", help="own (generated) keys per row")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine_header())
    if not kernels.load(KERNEL):
        print(f"the kernel does not build here: {kernels.failure(KERNEL)}")
        return 1
    per_prompt = args.rows // args.prompts
    print(f"{args.prompts} prompts x {per_prompt} rows, 3 KV heads x 3 queries of 64, prompt {args.width} tokens "
          f"(up to {args.pad} padding); microseconds per layer call, median of {args.rounds} alternating rounds of {args.calls} calls")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for length in (int(v) for v in args.lengths.split(",")):
            x = inputs(dtype, args.prompts, per_prompt, args.width, length, args.pad)
            want = exact(x)
            times: dict[str, list[float]] = {"torch": [], "llmrl": []}
            for fn in (torch_fused, llmrl_kernel):
                fn(x)  # warm-up
            for _ in range(args.rounds):
                times["torch"].append(per_call_us(torch_fused, x, args.calls))
                times["llmrl"].append(per_call_us(llmrl_kernel, x, args.calls))
            a, b = statistics.median(times["torch"]), statistics.median(times["llmrl"])
            err_a = (torch_fused(x).double() - want).abs().max().item()
            err_b = (llmrl_kernel(x).double() - want).abs().max().item()
            print(f"{str(dtype).split('.')[-1]:>9} own keys {length:4d}: torch fused {a:8.1f} us, llmrl kernel {b:8.1f} us, "
                  f"speedup {a / b:5.2f}x | max |error| vs fp64: torch {err_a:.2e}, llmrl {err_b:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
