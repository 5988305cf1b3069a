"""A decoder layer's linears at decode shapes: separate, grouped, and grouped with packed weights.

The `hf` engine groups q/k/v and gate/up into one product each and packs the weights for oneDNN
(llmrl/rollout/packed_linears.py). This bench times the three forms side by side on one layer's
shapes (SmolLM2-135M's by default): per round, each form runs --calls times the products one
decode step makes in a layer (q, k, v, o, gate, up, down), and the forms alternate over --rounds.
It prints the median microseconds per layer and the largest difference of every output from the
separate linears'. Where packing is not available (a GPU, a torch without oneDNN) the packed form
falls back to the grouped one, and the bench says so.

    .venv/bin/python bench/packed_linears.py                       # bf16 where native, else fp32; rows 32 and 8
    .venv/bin/python bench/packed_linears.py --dtype fp32 --rows 64
    python3 bench/packed_linears.py --device cuda                   # needs only torch
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from machine import machine_header, native_bf16  # noqa: E402


def _load_packed_linears():  # noqa: ANN202
    """The module by its file, so the bench needs torch alone (not llmrl's other dependencies)."""
    spec = importlib.util.spec_from_file_location("packed_linears", ROOT / "llmrl" / "rollout" / "packed_linears.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


packed_linears = _load_packed_linears()


class Layer(nn.Module):
    """The linears of a Llama-style decoder layer, under the names models give them."""

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def products(self, x: torch.Tensor, attended: torch.Tensor, inner: torch.Tensor) -> list[torch.Tensor]:
        """The calls one decode step makes, in a model's order (inputs fixed: only the products are timed)."""
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(attended),
                self.gate_proj(x), self.up_proj(x), self.down_proj(inner)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's sizes by default")
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--rows", default="32,8", help="comma-separated decode batch sizes")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 where native (always on a GPU), else fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=200, help="layer steps per timing")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    print(machine_header())
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    name = args.dtype or ("bf16" if device.type == "cuda" or native_bf16() else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    torch.manual_seed(0)
    separate = Layer(args.hidden, args.intermediate, args.heads, args.kv_heads).to(device, dtype).eval()
    forms = {"separate": separate}
    for form, pack in (("grouped", False), ("grouped+packed", True)):
        layer = Layer(args.hidden, args.intermediate, args.heads, args.kv_heads).to(device, dtype).eval()
        layer.load_state_dict(separate.state_dict())
        packed_linears.pack_linears(layer, pack=pack)
        forms[form] = layer
    packable = packed_linears._packed_product(forms["grouped+packed"].q_proj.group.weight, None, 32) is not None
    print(f"layer: hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads}, {name}, {device}; "
          f"oneDNN packing {'available' if packable else 'not available here: grouped+packed runs as grouped'}")

    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, 1, args.hidden, device=device, dtype=dtype)
        attended = torch.randn(rows, 1, args.heads * (args.hidden // args.heads), device=device, dtype=dtype)
        inner = torch.randn(rows, 1, args.intermediate, device=device, dtype=dtype)
        with torch.no_grad():
            want = separate.products(x, attended, inner)
            for form, layer in forms.items():
                got = layer.products(x, attended, inner)
                worst = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
                print(f"  rows {rows}: {form:<15} largest output difference from separate {worst:.3g}")
            times: dict[str, list[float]] = {form: [] for form in forms}
            for _ in range(args.rounds + 1):  # the first round warms up and is not counted
                for form, layer in forms.items():
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        layer.products(x, attended, inner)
                    synchronize(device)
                    times[form].append((time.perf_counter() - start) / args.calls * 1e6)
        base = statistics.median(times["separate"][1:])
        for form, values in times.items():
            median = statistics.median(values[1:])
            print(f"  rows {rows}: {form:<15} {median:8.1f} us a layer (rounds {min(values[1:]):.1f}-{max(values[1:]):.1f})  "
                  f"speedup {base / median:.2f}x over separate")


if __name__ == "__main__":
    main()
