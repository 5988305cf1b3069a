"""The parts of llmrl's fused decode step against what transformers runs for them, side by side.

llmrl/rollout/fused_decode.py replaces, per decode step and layer, transformers' RMSNorm (twice,
each after a residual add), rotary embedding and SiLU-gated product with single-pass kernels
(llmrl/kernels/decode_ops.cpp), and multiplies the lm_head through a packed weight. This bench
times each pair at one decode step's shapes (SmolLM2-135M's by default), alternating the two
forms over --rounds, and prints the median microseconds per call, the speedup and the largest
difference between the two outputs.

    .venv/bin/python bench/decode_ops.py                      # bf16 where native, else fp32; 64 rows
    .venv/bin/python bench/decode_ops.py --dtype fp32 --rows 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's llmrl
sys.path.insert(0, str(ROOT / "bench"))
from machine import machine_header, native_bf16  # noqa: E402

from llmrl import kernels  # noqa: E402
from llmrl.rollout.packed_linears import PackedWeight  # noqa: E402


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def pairs(rows: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, dtype: torch.dtype):
    """name -> (transformers' form, llmrl's form), both returning the output to compare."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    ops = torch.ops.llmrl_kernels
    g = torch.Generator().manual_seed(0)
    dim = hidden // heads
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    delta = torch.randn(rows, hidden, generator=g).to(dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    angles = torch.arange(rows)[:, None].float() * (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    gate_up = torch.randn(rows, 2 * intermediate, generator=g).to(dtype)
    head = torch.randn(vocab, hidden, generator=g).to(dtype) / hidden**0.5
    packed_head = PackedWeight(head, None, pack=True, rows_hint=rows)

    def hf_rotary() -> torch.Tensor:
        q = qkv[:, : heads * dim].view(rows, 1, heads, dim).transpose(1, 2)
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, 1, kv_heads, dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None])
        return torch.cat([q.transpose(1, 2).reshape(rows, -1), k.transpose(1, 2).reshape(rows, -1)], dim=1)

    def own_rotary() -> torch.Tensor:
        out = qkv.clone()  # the op rotates in place; the clone is timed on this side only
        ops.rotary_(out, heads + kv_heads, cos, sin)
        return out[:, : (heads + kv_heads) * dim]

    residual = x.clone()
    return {
        "residual add + RMSNorm": (lambda: norm(x + delta), lambda: ops.add_rms_norm(residual.copy_(x), delta, norm.weight, 1e-5)),
        "rotary (q and k)": (hf_rotary, own_rotary),
        "SiLU(gate) * up": (
            lambda: torch.nn.functional.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:],
            lambda: ops.silu_mul(gate_up),
        ),
        "lm_head": (lambda: torch.nn.functional.linear(x, head), lambda: packed_head.product(x)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 where native, else fp32")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if native_bf16() else "fp32")]
    print(machine_header())
    if not kernels.load(kernels.DECODE):
        print(f"llmrl's decode kernels do not build here: {kernels.failure(kernels.DECODE)}")
        return
    print(f"{args.rows} rows, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab}, {dtype}; median of {args.rounds} alternating rounds of {args.calls} calls (lm_head: a tenth)")
    for name, (theirs, ours) in pairs(args.rows, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, dtype).items():
        calls = max(1, args.calls // 10) if name == "lm_head" else args.calls
        times: dict[str, list[float]] = {"transformers": [], "llmrl": []}
        for _ in range(args.rounds):
            times["transformers"].append(per_call_us(theirs, calls))
            times["llmrl"].append(per_call_us(ours, calls))
        a, b = statistics.median(times["transformers"]), statistics.median(times["llmrl"])
        difference = (theirs().float() - ours().float()).abs().max().item()
        print(f"  {name:24s} transformers {a:9.1f} us   llmrl {b:9.1f} us   speedup {a / b:5.2f}x   max |difference| {difference:.2e}")


if __name__ == "__main__":
    main()
