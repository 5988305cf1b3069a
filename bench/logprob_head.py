"""The lm_head's logprob pass, forward and backward: llmrl's closed-form chunks against autograd.

In a GRPO update of a small model the vocabulary-sized work is a large share: SmolLM2-135M's
tied head is 28M of its 135M weights, and every response token's logits span 49,152 entries.
llmrl computes each chunk of tokens as one autograd function whose backward is written out
(the gradient of log p_t is onehot(t) - softmax; llmrl/train/logprobs.py). The reference here
is the straightforward way: each chunk checkpointed, autograd differentiating log_softmax and
gather, the entropy computed for logging without a graph. Both run the same chunks on the same
tensors, alternating, under bf16 autocast over fp32 weights (where the CPU has native bf16)
and in fp32; the loss is sum(a * logp) with random a, as a policy gradient would be.

    .venv/bin/python bench/logprob_head.py                    # 4,096 tokens, SmolLM2's head
    .venv/bin/python bench/logprob_head.py --tokens 512 --repeats 2
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmrl.train.logprobs import DEFAULT_CHUNK_TOKENS, token_logprobs
from machine import machine_header, native_bf16


def _reference_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    hidden = hidden[:-1]  # the last state predicts nothing
    parts = [
        checkpoint(_reference_chunk, hidden[s : s + chunk], weight, targets[s : s + chunk], use_reentrant=False)[0]
        for s in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(parts)


def llmrl_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    # One row of len(targets) + 1 positions: state t predicts token t + 1, which is targets[t].
    logp, _ = token_logprobs(hidden[None], weight, torch.cat([targets[:1], targets])[None], want_entropy=True,
                             chunk_tokens=chunk, entropy_grad=False)
    return logp[0, 1:]


IMPLEMENTATIONS = {"autograd+checkpoint": reference_logprobs, "llmrl": llmrl_logprobs}


def time_once(fn, hidden, weight, targets, coef, chunk, precision) -> tuple[float, torch.Tensor]:
    hidden.grad = weight.grad = None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        logp = fn(hidden, weight, targets, chunk)
    (coef * logp).sum().backward()
    return time.perf_counter() - start, weight.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="response tokens in the pass (about vs_trl's batch)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_header())
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens + 1, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,))
    coef = torch.randn(args.tokens)
    print(f"{args.tokens} tokens x {args.vocab} vocabulary, hidden {args.hidden}, chunks of {args.chunk}; "
          f"median of {args.repeats} after one warm-up, implementations alternating")
    for precision in ["fp32"] + (["bf16"] if native_bf16() else []):
        times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
        grads: dict[str, torch.Tensor] = {}
        for round_ in range(args.repeats + 1):
            for name, fn in IMPLEMENTATIONS.items():
                spent, grads[name] = time_once(fn, hidden, weight, targets, coef, args.chunk, precision)
                if round_:
                    times[name].append(spent)
        ref, ours = grads["autograd+checkpoint"], grads["llmrl"]
        rel = float((ours - ref).norm() / ref.norm())
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"  {precision}  {name:20s} median {medians[name]:.3f} s  (min {min(t):.3f}, max {max(t):.3f})")
        ratios = [a / b for a, b in zip(times["autograd+checkpoint"], times["llmrl"])]
        print(f"  {precision}  speedup {medians['autograd+checkpoint'] / medians['llmrl']:.2f}x "
              f"(per round {min(ratios):.2f}-{max(ratios):.2f}x); weight gradients differ by {rel:.1e} of their norm")


if __name__ == "__main__":
    main()
