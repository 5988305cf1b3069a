"""The update phase's achieved FLOP/s: one GRPO step of the torch engine against the matmul peak.

The batch is GRPO-shaped: --prompts arithmetic prompts through the model's chat template, --n
samples each, random response tokens with lengths drawn uniformly from [--min-response,
--max-response] so rows differ in length and padding matters, and a nonzero advantage on
every row (so train.skip_zero_advantage_rows has nothing to skip and every row is trained).

FLOPs = 6 x matmul weights x real (non-padding) tokens of the batch: 2 for the forward, 4 for
the backward, per weight and token; recomputation is not counted, nor attention (printed as a
share for reference). Matmul weights are every nn.Linear's weight, the tied lm_head included
(the tie saves memory, not the multiply), the embedding lookup excluded; for SmolLM2-135M they
come to about its parameter count. Achieved FLOP/s = FLOPs / update wall time (the whole
`engine.step`: forward, backward, clipping, AdamW), median of --repeats after one warm-up,
compared with the square-matmul peak measured here at the same precision.

Batchings compared (each a TrainConfig; all start from the same weights and stay there, lr 0,
so every step does identical work):
  rows16          micro_batch_size=16: each micro-batch padded to its longest row. What every
                  recipe sets.
  tokens          micro_batch_tokens=budget: rows sorted by length, packed up to the padded
                  token budget (default 16 x the longest row, so no micro-batch is larger than
                  rows16's worst one).
  rows16+shared   rows16 with shared_prompt_forward, responses padded (packed_responses off): each
                  distinct prompt of a micro-batch runs once, its samples' responses after it.
  rows16+packed   rows16+shared with the prompts and responses packed into one row of their
                  real tokens (TrainConfig's defaults, so what recipes run).
  tokens+shared   tokens with shared_prompt_forward, responses padded.
For each: the token slots the decoder processes (prompt-once slots under shared), how many of
them are padding, and the FLOP/s. Under shared the useful FLOPs stay those of the full batch
(the work the update stands for), so its figure can exceed what the matmuls actually did;
"executed" shows that rate: 6 x weights x slots processed / time. optim_s is the part of the
step spent clipping gradients and in AdamW (fixed per step, whatever the batch); "fwd+bwd"
is the FLOP/s of the rest.

--attention lists model.attn_implementation values: each configuration runs under each, in the
same alternating rounds (so the same weights and batch), and a per-round speedup is printed.

bf16 (autocast over fp32 master weights, train.precision=bf16) runs too where the CPU has
native bf16 matmuls (avx512_bf16 / amx_bf16); elsewhere it is emulated and would take hours.

    .venv/bin/python bench/mfu.py                          # SmolLM2-135M, 4 x 8 rows, fp32 (+ bf16)
    .venv/bin/python bench/mfu.py --model tiny --prompts 2 --n 4 --max-response 32 --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import time

from llmrl.mkl_on_amd import reexec_with_preload

reexec_with_preload()  # measured as `llmrl` runs: MKL's tuned kernels on AMD CPUs

import torch
import transformers

from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import Batch, LossContext
from llmrl.batch import split_micro_batches
from llmrl.data import build_tasks
from llmrl.data.config import DataConfig
from llmrl.models import GROUPED_ATTENTION, ModelConfig, load_policy, load_tokenizer
from llmrl.train.engine import TrainConfig
from llmrl.train.shared_prefix import plan_shared_prefix
from llmrl.train.torch_engine import TorchTrainEngine
from machine import machine_header, matmul_peak_gflops, matmul_weights, native_bf16
from step_batches import pack_rows


def grpo_batch(model: str, prompts: int, n: int, min_response: int, max_response: int, seed: int) -> Batch:
    """A right-padded step batch (the layout llmrl.batch.collate makes) of n samples per prompt."""
    tokenizer = load_tokenizer(model)
    tasks = build_tasks(DataConfig(type="arithmetic", num_train=prompts, num_test=1), tokenizer, split="train").tasks
    g = torch.Generator().manual_seed(seed)
    rows = []
    for task in tasks[:prompts]:
        for _ in range(n):
            length = int(torch.randint(min_response, max_response + 1, (1,), generator=g))
            response = torch.randint(100, 40000, (length,), generator=g).tolist()
            # Never exactly zero: every row carries gradient, whatever skip_zero_advantage_rows says.
            advantage = float(torch.randn(1, generator=g)) or 1.0
            rows.append((list(task.prompt_ids), response, advantage))
    return pack_rows(rows)


def token_slots(batch: Batch, cfg: TrainConfig) -> tuple[int, int, int]:
    """(micro-batches, decoder token slots processed, real tokens among them) for the step
    under `cfg`, by the same splitting and prefix planning the torch engine runs."""
    micro_batches = split_micro_batches(batch, cfg.micro_batch_size, cfg.micro_batch_tokens)
    slots = real = 0
    for mb in micro_batches:
        plan = plan_shared_prefix(mb) if cfg.shared_prompt_forward else None
        if plan is None:  # the plain path (also what shared falls back to when nothing is shared)
            slots += mb["input_ids"].numel()
            real += int(mb["attention_mask"].sum())
        else:
            used = len(plan.root_ids) + int(plan.prefix_mask.sum() + plan.suffix_mask.sum())
            # packed: one row of real tokens (root, prompts, responses); else prompts and responses padded
            slots += used if cfg.packed_responses else len(plan.root_ids) + plan.prefix_ids.numel() + plan.suffix_ids.numel()
            real += used
    return len(micro_batches), slots, real


def attention_flops(batch: Batch, config: object) -> float:
    """Training attention FLOPs of the batch's real tokens (causal: token t attends to t + 1
    keys; QK^T and AV, 2 FLOPs each per head dimension, x3 for forward + backward)."""
    lengths = batch["attention_mask"].sum(-1).double()
    keys = float((lengths * (lengths + 1) / 2).sum())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 3 * 4 * config.num_hidden_layers * heads * head_dim * keys


def time_optimizer(engine: TorchTrainEngine, spent: list[float]) -> None:
    """Add the seconds of each step's gradient clipping and AdamW step to `spent[0]`. Both cost
    the same whatever the batch (a pass over every weight, its gradient and two Adam moments),
    so on a small batch they hide the forward/backward's rate; timed by wrapping the engine's
    own hooks on this instance, llmrl's code unchanged."""
    for hook in ("_clip_gradients", "_optimizer_step"):
        original = getattr(engine, hook)

        def timed(original=original):  # bind this hook's original now, not the loop's last
            start = time.perf_counter()
            try:
                return original()
            finally:
                spent[0] += time.perf_counter() - start

        setattr(engine, hook, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--min-response", type=int, default=16)
    parser.add_argument("--max-response", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=16, help="rows per micro-batch (the recipes' value)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="token budget; default micro-batch-size x longest row")
    parser.add_argument("--precisions", default=None, help="comma-separated fp32,bf16; default fp32, plus bf16 where native")
    parser.add_argument("--configs", default=None, help="comma-separated subset of rows16,tokens,rows16+shared,rows16+packed,tokens+shared")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration, after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default=GROUPED_ATTENTION,
                        help=f"comma-separated model.attn_implementation values, each run with every config "
                             f"(e.g. sdpa,{GROUPED_ATTENTION} compares transformers' SDPA with llmrl's grouped one)")
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar, once per model load
    print(machine_header())
    precisions = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if native_bf16() else [])
    # Peaks first, while nothing else of ours runs.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak_gflops(dtypes[p]) for p in precisions}
    print("matmul peak: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in peaks.items()) + " (2048^2, best of 5)")

    batch = grpo_batch(args.model, args.prompts, args.n, args.min_response, args.max_response, args.seed)
    lengths = batch["attention_mask"].sum(-1)
    real_tokens = int(lengths.sum())
    response_tokens = int(batch["loss_mask"].sum())
    budget = args.micro_batch_tokens or args.micro_batch_size * int(lengths.max())
    configs = {
        "rows16": dict(micro_batch_size=args.micro_batch_size, shared_prompt_forward=False),
        "tokens": dict(micro_batch_tokens=budget, shared_prompt_forward=False),
        "rows16+shared": dict(micro_batch_size=args.micro_batch_size, shared_prompt_forward=True, packed_responses=False),
        "rows16+packed": dict(micro_batch_size=args.micro_batch_size, shared_prompt_forward=True),
        "tokens+shared": dict(micro_batch_tokens=budget, shared_prompt_forward=True, packed_responses=False),
    }
    if args.configs:
        configs = {name: configs[name] for name in args.configs.split(",")}
    attentions = args.attention.split(",")
    if len(attentions) > 1:  # every config under every attention, named config@attention
        configs = {f"{name}@{impl}": dict(flags, attention=impl) for name, flags in configs.items() for impl in attentions}
    else:
        configs = {name: dict(flags, attention=attentions[0]) for name, flags in configs.items()}

    algo = resolve_algorithm(AlgorithmConfig(name="grpo"))
    loss_fn = LOSSES[algo.loss]
    model = load_policy(ModelConfig(name=args.model, attn_implementation=attentions[0]))
    weights = matmul_weights(model)
    params = sum(p.numel() for p in model.parameters())
    flops = 6.0 * weights * real_tokens
    hidden = model.config.hidden_size
    head = model.get_output_embeddings().weight.numel()
    # llmrl runs the lm_head only where a logprob is needed (the response tokens), so the work
    # the update needs is less than 6 N T by the head's share on prompt tokens.
    needed = 6.0 * ((weights - head) * real_tokens + head * response_tokens)
    print(
        f"model {args.model}: {params / 1e6:.1f}M parameters, {weights / 1e6:.1f}M matmul weights (hidden {hidden}); "
        f"loss {algo.loss}\nbatch: {args.prompts} prompts x {args.n} samples = {len(lengths)} rows, responses "
        f"{args.min_response}-{args.max_response} tokens, rows {int(lengths.min())}-{int(lengths.max())} tokens, "
        f"{real_tokens} real tokens ({response_tokens} response)\n"
        f"FLOPs per step = 6 x {weights / 1e6:.1f}M x {real_tokens} = {flops / 1e9:.1f} GFLOP "
        f"(attention would add {100 * attention_flops(batch, model.config) / flops:.1f}%; with the lm_head on response "
        f"tokens only, as llmrl runs it, the step needs {needed / 1e9:.1f} GFLOP)\n"
        f"token budget for 'tokens': {budget} padded tokens per micro-batch; {args.repeats} timed steps after 1 warm-up"
    )

    for precision in precisions:
        peak = peaks[precision]
        engines = {}
        optim: dict[str, list[float]] = {}
        for name, flags in configs.items():
            cfg = TrainConfig(lr=0.0, precision=precision, skip_zero_advantage_rows=False,
                              **{k: v for k, v in flags.items() if k != "attention"})
            engines[name] = (cfg, TorchTrainEngine(model, cfg, total_updates=1))
            optim[name] = [0.0]
            time_optimizer(engines[name][1], optim[name])
        times: dict[str, list[float]] = {name: [] for name in configs}
        optim_times: dict[str, list[float]] = {name: [] for name in configs}
        # Rounds interleave the configurations so drift of the machine falls on all alike;
        # round 0 is the warm-up (first-step allocations, AdamW state) and is not counted.
        for round_index in range(1 + args.repeats):
            for name, (cfg, engine) in engines.items():
                model.set_attn_implementation(configs[name]["attention"])
                optim[name][0] = 0.0
                start = time.perf_counter()
                engine.step(batch, loss_fn, LossContext(step=0, cfg=algo))
                if round_index:
                    times[name].append(time.perf_counter() - start)
                    optim_times[name].append(optim[name][0])
            print(f"  {precision} round {round_index}{' (warm-up)' if not round_index else ''} done", flush=True)

        print(f"\n{precision}: matmul peak {peak:.1f} GFLOP/s")
        print(
            f"{'config':<28} {'micro':>5} {'slots':>7} {'padding':>8} {'update_s':>9} {'min-max':>13} "
            f"{'GFLOP/s':>8} {'% peak':>7} {'executed':>9} {'optim_s':>8} {'fwd+bwd GFLOP/s':>16}"
        )
        baseline = None
        for name, (cfg, _) in engines.items():
            micro, slots, real = token_slots(batch, cfg)
            median = statistics.median(times[name])
            achieved = flops / median / 1e9
            executed = 6.0 * weights * slots / median / 1e9
            optim_s = statistics.median(optim_times[name])
            baseline = baseline or median
            print(
                f"{name:<28} {micro:>5} {slots:>7} {100 * (slots - real) / slots:>7.1f}% {median:>9.2f} "
                f"{min(times[name]):>6.2f}-{max(times[name]):<6.2f} {achieved:>8.1f} {100 * achieved / peak:>6.1f}% "
                f"{executed:>9.1f} {optim_s:>8.2f} {flops / max(median - optim_s, 1e-9) / 1e9:>16.1f}  "
                f"({baseline / median:.2f}x {next(iter(engines))})"
            )
        # Rounds alternate the variants, so a per-round ratio cancels the machine's drift.
        for name in engines:
            config, _, impl = name.partition("@")
            first = f"{config}@{attentions[0]}"
            if impl and impl != attentions[0]:
                paired = [x / y for x, y in zip(times[first], times[name])]
                print(f"speedup {name} vs {first}: per round {' '.join(f'{r:.2f}x' for r in paired)}, "
                      f"median {statistics.median(paired):.2f}x")
        del engines  # the AdamW states, before the next precision builds its own


if __name__ == "__main__":
    main()
