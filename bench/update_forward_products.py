"""What the update's forward products cost: one GRPO step of the torch engine as it runs, and the
same step with every decoder linear's forward output supplied instead of computed.

In an on-policy step with one optimizer step per rollout, the update's forward recomputes what
the rollout's decode computed with the same weights. Handing the decode's linear outputs to the
update would skip those products, and nothing else would change: each linear's backward still
multiplies by its weight and by its input, as autograd's does. This bench measures that
saving before anything is built. A capture pass of the same step stands in for the decode: a
hook keeps each decoder linear's output, and the timed step replaces each linear's forward by
`Supplied`, which returns the kept output and takes the linear's backward. The attention, the
norms, SiLU, the lm_head's head pass and AdamW still run. The supplied outputs equal the
computed ones, so the two steps must give the same loss and the same gradients, bit for bit; the
bench checks that. From a real decode they would differ by fp32 rounding (the products sum in
other orders).

The batch is `bench/mfu.py`'s at the vs_trl shape: 4 prompts x 8 samples, responses of
--min-response to --max-response random tokens. Rounds alternate plain and supplied; medians of
--repeats after one warm-up round.

    .venv/bin/python bench/update_forward_products.py
    .venv/bin/python bench/update_forward_products.py --model tiny --min-response 8 --max-response 16 --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from llmrl.mkl_on_amd import reexec_with_preload

reexec_with_preload()  # measured as `llmrl` runs: MKL's tuned kernels on AMD CPUs

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm  # noqa: E402
from llmrl.algorithms.base import LossContext  # noqa: E402
from llmrl.models import GROUPED_ATTENTION, ModelConfig, load_policy  # noqa: E402
from llmrl.train.engine import TrainConfig  # noqa: E402
from llmrl.train.torch_engine import TorchTrainEngine  # noqa: E402
from machine import machine_header, matmul_peak_gflops  # noqa: E402
from mfu import grpo_batch  # noqa: E402


class Supplied(torch.autograd.Function):
    """y = x @ weight.T with y given: no product forward, the linear's own backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = (rows @ weight).view(*grad.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        grad_weight = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class SuppliedOutputs:
    """Keeps the decoder linears' outputs of one step (`capture`), then serves them back in call
    order to the next step (`serving`)."""

    def __init__(self, model: nn.Module) -> None:
        self.linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]
        if any(m.bias is not None for m in self.linears):
            raise SystemExit("this bench's Supplied takes linears without a bias")
        self.kept: dict[int, list[torch.Tensor]] = {id(m): [] for m in self.linears}

    def capture(self, run: Any) -> None:
        hooks = [m.register_forward_hook(lambda m, _, out: self.kept[id(m)].append(out.detach())) for m in self.linears]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()

    def serving(self, run: Any) -> Any:
        for m in self.linears:
            m.forward = lambda x, m=m: Supplied.apply(x, m.weight, self.kept[id(m)].pop(0))
        try:
            return run()
        finally:
            for m in self.linears:
                del m.forward
            unused = sum(len(v) for v in self.kept.values())
            for v in self.kept.values():
                v.clear()
            if unused:
                raise SystemExit(f"{unused} kept outputs were not asked for: the steps called the linears differently")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--min-response", type=int, default=100)
    parser.add_argument("--max-response", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()
    print(machine_header())
    print(f"matmul peak fp32: {matmul_peak_gflops(torch.float32):.1f} GFLOP/s (2048^3, best of 5)")
    batch = grpo_batch(args.model, args.prompts, args.n, args.min_response, args.max_response, args.seed)
    print(f"batch: {args.prompts} prompts x {args.n} samples, responses {args.min_response}-{args.max_response} tokens, "
          f"{int(batch['attention_mask'].sum())} real tokens ({int(batch['loss_mask'].sum())} response); fp32, micro-batch "
          f"{args.micro_batch_size}, lr 0 (every step the same work)")
    algo = resolve_algorithm(AlgorithmConfig(name="grpo"))
    loss_fn = LOSSES[algo.loss]
    model = load_policy(ModelConfig(name=args.model, attn_implementation=GROUPED_ATTENTION))
    engine = TorchTrainEngine(model, TrainConfig(lr=0.0, precision="fp32", skip_zero_advantage_rows=False,
                                                 micro_batch_size=args.micro_batch_size), total_updates=1)
    grads: list[list[torch.Tensor]] = []
    take_step = engine._optimizer_step

    def optimizer_step_keeping_grads() -> Any:  # the gradients as AdamW gets them
        grads.append([p.grad.detach().clone() for p in model.parameters() if p.grad is not None])
        return take_step()

    engine._optimizer_step = optimizer_step_keeping_grads  # type: ignore[method-assign]
    supplied = SuppliedOutputs(model)
    print(f"{len(supplied.linears)} decoder linears")

    def step() -> tuple[float, dict[str, float]]:
        start = time.perf_counter()
        metrics = engine.step(batch, loss_fn, LossContext(step=0, cfg=algo))
        return time.perf_counter() - start, metrics

    times: dict[str, list[float]] = {"plain": [], "supplied": []}
    for round_index in range(1 + args.repeats):
        grads.clear()
        plain_s, plain = step()
        supplied.capture(step)
        supplied_s, served = supplied.serving(step)
        same = plain["actor/loss"] == served["actor/loss"] and all(torch.equal(a, b) for a, b in zip(grads[0], grads[2]))
        print(f"  round {round_index}{' (warm-up)' if not round_index else ''}: plain {plain_s:.2f} s, supplied {supplied_s:.2f} s, "
              f"same loss and gradients: {'yes' if same else 'NO'}", flush=True)
        if not same:
            raise SystemExit("the supplied step's loss or gradients differ from the plain step's")
        if round_index:
            times["plain"].append(plain_s)
            times["supplied"].append(supplied_s)
    plain_median, supplied_median = statistics.median(times["plain"]), statistics.median(times["supplied"])
    print(f"update s, median of {args.repeats}: plain {plain_median:.2f} ({min(times['plain']):.2f}-{max(times['plain']):.2f}), "
          f"supplied {supplied_median:.2f} ({min(times['supplied']):.2f}-{max(times['supplied']):.2f})")
    print(f"the forward products' share of the update: {plain_median - supplied_median:.2f} s, "
          f"{100 * (plain_median - supplied_median) / plain_median:.0f}%; speedup if supplied: {plain_median / supplied_median:.2f}x")


if __name__ == "__main__":
    main()
