"""Update cost of one GRPO step, with and without the two exact shortcuts of the torch engine.

- `skip`: rows whose advantages are all zero (groups where every sample scored the same) run no
  forward or backward (`train.skip_zero_advantage_rows`).
- `shared`: each prompt runs once per micro-batch and its key/value cache is shared by its
  samples (`train.shared_prompt_forward`).

The batch is shaped like the quickstart's: real arithmetic prompts through the model's chat
template, n samples each, random response tokens, and a chosen fraction of groups with zero
advantage. Every configuration starts from the same weights and takes the same optimizer
step; the script also prints how far its gradient is from the plain configuration's (they
should agree to float rounding). Times are the median of --repeats steps.

    .venv/bin/python bench/update_speed.py [--model smollm2-135m] [--zero-groups 0.5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import LossContext
from llmrl.data import build_tasks
from llmrl.data.config import DataConfig
from llmrl.models import ModelConfig, load_policy, load_tokenizer
from llmrl.train.engine import TrainConfig
from llmrl.train.torch_engine import TorchTrainEngine
from step_batches import pack_rows

CONFIGS = {
    "plain": dict(skip_zero_advantage_rows=False, shared_prompt_forward=False),
    "skip": dict(skip_zero_advantage_rows=True, shared_prompt_forward=False),
    "shared": dict(skip_zero_advantage_rows=False, shared_prompt_forward=True),
    "skip+shared": dict(skip_zero_advantage_rows=True, shared_prompt_forward=True),
}


def step_batch(model_name: str, prompts: int, n: int, max_response: int, zero_groups: float, seed: int) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(model_name)
    tasks = build_tasks(DataConfig(type="arithmetic", num_train=prompts, num_test=1), tokenizer, split="train").tasks
    g = torch.Generator().manual_seed(seed)
    rows = []
    for group, task in enumerate(tasks[:prompts]):
        zero = group < round(zero_groups * prompts)
        for _ in range(n):
            length = int(torch.randint(max_response // 4, max_response + 1, (1,), generator=g))
            response = torch.randint(100, 40000, (length,), generator=g).tolist()
            rows.append((list(task.prompt_ids), response, 0.0 if zero else float(torch.randn(1, generator=g))))
    return pack_rows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-response", type=int, default=32)
    parser.add_argument("--zero-groups", type=float, default=0.5, help="fraction of groups whose advantages are all zero")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    batch = step_batch(args.model, args.prompts, args.n, args.max_response, args.zero_groups, seed=0)
    algo = resolve_algorithm(AlgorithmConfig(name="grpo"))
    tokens = int(batch["attention_mask"].sum())
    print(f"model {args.model}: {batch['input_ids'].shape[0]} rows, {tokens} tokens, "
          f"{int(batch['loss_mask'].sum())} response tokens, {args.zero_groups:.0%} zero-advantage groups, threads {torch.get_num_threads()}")
    print(f"{'config':<12} {'update_s':>9} {'speedup':>8} {'rows_trained':>13} {'max_rel_grad_diff':>18}")
    reference: dict[str, torch.Tensor] | None = None
    plain_time = None
    for name, flags in CONFIGS.items():
        times, metrics = [], {}
        for _ in range(args.repeats):
            torch.manual_seed(0)
            model = load_policy(ModelConfig(name=args.model))
            cfg = TrainConfig(lr=1e-5, precision="fp32", micro_batch_size=args.micro_batch_size, **flags)
            engine = TorchTrainEngine(model, cfg, total_updates=1)
            start = time.perf_counter()
            metrics = engine.step(batch, LOSSES["ppo_clip"], LossContext(step=0, cfg=algo))
            times.append(time.perf_counter() - start)
        grads = {k: v.grad.detach().clone() for k, v in model.named_parameters() if v.grad is not None}
        if reference is None:
            reference = grads
        # How far this config's gradient is from the plain one's, per tensor, relative to its norm.
        diff = max(float((grads[k] - g).norm() / g.norm().clamp(min=1e-30)) for k, g in reference.items())
        median = statistics.median(times)
        plain_time = plain_time or median
        print(f"{name:<12} {median:>9.2f} {plain_time / median:>7.2f}x {metrics['actor/rows_trained_frac']:>13.2f} {diff:>18.2e}")


if __name__ == "__main__":
    main()
