"""One decode step of the `hf` engine's model at a fixed batch and context: attention side by side.

bench/rollout.py times whole rollouts, but two attention implementations round floats
differently, so after a few dozen tokens their samples diverge, finish at different lengths and
keep different numbers of rows alive: tokens/s then compares different work. This bench holds
the work fixed instead. For each implementation it prefills --batch rows of --context tokens
(left-padded by up to --pad tokens, as the engine's batches are), then times --steps decode
forwards of one token per row over the growing cache, exactly the call the engine makes per
token. Implementations alternate over --rounds; the median per-step time is printed with its
spread, and a speedup line against transformers' `sdpa`.

    .venv/bin/python bench/decode_step.py                       # fp32 and, where native, bf16
    .venv/bin/python bench/decode_step.py --model tiny --steps 4 --rounds 1   # smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llmrl
from machine import machine_header, native_bf16  # noqa: E402  (bench/machine.py)

from llmrl.models import ModelConfig, load_causal_lm  # noqa: E402
from llmrl.grouped_attention import NAME as GROUPED  # noqa: E402
from llmrl.rollout.kv_cache import PreallocatedCache  # noqa: E402

IMPLEMENTATIONS = ("sdpa", GROUPED, "eager")


@torch.no_grad()
def time_decode(model: torch.nn.Module, batch: int, context: int, pad: int, steps: int, cache_kind: str = "dynamic") -> float:
    """Seconds per decode step after a prefill, with the engine's masks and positions."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=g)
    attention = torch.ones(batch, context, dtype=torch.long)
    for row in range(batch):
        attention[row, : row % (pad + 1)] = 0  # left padding of 0..pad slots
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache() if cache_kind == "dynamic" else PreallocatedCache(room=steps)
    model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_pos = positions[:, -1] + 1
    token = torch.randint(0, vocab, (batch, 1), generator=g)
    start = time.perf_counter()
    for _ in range(steps):
        attention = torch.cat([attention, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        model(input_ids=token, attention_mask=attention, position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=96, help="prompt tokens prefilled per row")
    parser.add_argument("--pad", type=int, default=16, help="rows are left-padded by 0..pad slots")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="auto", help="comma list of float32,bfloat16; auto = both where bf16 is native")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--caches", default="dynamic",
                        help="comma list of dynamic (transformers' DynamicCache, torch.cat per token), preallocated "
                             "(llmrl/rollout/kv_cache.py); every implementation runs with each")
    args = parser.parse_args()
    dtypes = (["float32", "bfloat16"] if native_bf16() else ["float32"]) if args.dtypes == "auto" else args.dtypes.split(",")
    names = [f"{impl}+{cache}" if cache != "dynamic" else impl for impl in args.implementations.split(",") for cache in args.caches.split(",")]
    print(machine_header())
    print(f"model {args.model}: batch {args.batch}, context {args.context} (+{args.steps} decoded), left padding 0..{args.pad}, "
          f"{args.steps} decode steps per round, {args.rounds} rounds, implementations alternating")
    for dtype in dtypes:
        model = load_causal_lm(ModelConfig(name=args.model), getattr(torch, dtype)).eval()
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                impl, _, cache = name.partition("+")
                model.set_attn_implementation(impl)
                times[name].append(time_decode(model, args.batch, args.context, args.pad, args.steps, cache or "dynamic"))
        print(f"\n{dtype}: ms per decode step ({args.batch} rows)")
        for name in names:
            ms = [1000 * t for t in times[name]]
            median = statistics.median(ms)
            spread = (max(ms) - min(ms)) / 2 / median
            print(f"  {name:<26} rounds [{' '.join(f'{x:7.1f}' for x in ms)} ]  median {median:7.1f} ms (+-{100 * spread:.1f}%)  "
                  f"{args.batch / median * 1000:7.1f} tok/s")
        base = statistics.median(times["sdpa"]) if "sdpa" in times else None
        for name in names:
            if base and name != "sdpa":
                print(f"  speedup {name} vs sdpa ({dtype}): {base / statistics.median(times[name]):.2f}x")
            impl, _, cache = name.partition("+")
            if cache and impl in times:
                print(f"  speedup {name} vs {impl} with DynamicCache ({dtype}): {statistics.median(times[impl]) / statistics.median(times[name]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
