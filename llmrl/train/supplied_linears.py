"""The packed pass's decoder linears, with the outputs the rollout's decode kept supplied.

Where the rollout's fused decode step kept its linear outputs (llmrl/rollout/decode_outputs.py)
and the trainer's weights are still the rollout's, a token the decode fed back needs no forward
product in the update: each linear of the packed pass (llmrl/train/packed_pass.py) takes the
kept rows for those tokens and multiplies only the others (the prompts, each row's last prompt
token and its last token, which the decode never fed). Its backward is the linear's own:

    y = x W^T + b        dL/dx = g W        dL/dW = g^T x        dL/db = sum of g over tokens

with x the trainer's own input. So the gradients are the plain pass's, up to the rounding by
which the decode's products differ from the trainer's (tests/test_decode_outputs.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from llmrl.rollout.decode_outputs import DecodeOutputs, Entry
from llmrl.train.shared_prefix import PrefixPlan


class _SuppliedLinear(torch.autograd.Function):
    """x [.., in] -> y [.., out], rows `gather` of `source` except rows `computed`, which are
    x W^T + b; the backward of the full linear."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, source: torch.Tensor,
        gather: torch.Tensor, computed: torch.Tensor,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = source.index_select(0, gather)
        if len(computed):
            out.index_copy_(0, computed, F.linear(rows.index_select(0, computed), weight, bias))
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.shape = bias is not None, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ weight).view(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_weight = g.t() @ rows if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


@dataclass
class SupplyPlan:
    """For the packed pass's N tokens: `gather` [N], each token's row of the kept outputs (any row
    for the computed ones); `computed` [K], the tokens multiplied as usual. `suffix_rows` [R, S]:
    the same rows laid out as the plan's suffixes, -1 where computed; a fed token's kept row also
    holds the head's logits for the token after it."""

    gather: torch.Tensor
    computed: torch.Tensor
    suffix_rows: torch.Tensor

    @property
    def supplied(self) -> int:
        return len(self.gather) - len(self.computed)


def supply_plan(plan: PrefixPlan, entries: dict[tuple[int, ...], Entry]) -> SupplyPlan | None:
    """Which tokens of `plan`'s packed pass (root, prompts' real tokens, then each row's suffix, in
    that order) have kept outputs; None when none do. A suffix row is matched by its whole token
    sequence, and only at the positions its decode fed."""
    root = plan.root_ids.tolist()
    prompt_real = plan.prefix_mask > 0
    prefixes = [root + plan.prefix_ids[u][prompt_real[u]].tolist() for u in range(len(plan.prefix_ids))]
    lengths = (plan.suffix_mask > 0).sum(-1).tolist()
    offset = len(root) + int(prompt_real.sum())
    gather = torch.zeros(offset + sum(lengths), dtype=torch.long)
    supplied = torch.zeros(len(gather), dtype=torch.bool)
    suffix_rows = torch.full(plan.suffix_ids.shape, -1, dtype=torch.long)
    for row, length in enumerate(lengths):
        prefix = prefixes[int(plan.source[row])]
        entry = entries.get(tuple(prefix) + tuple(plan.suffix_ids[row, :length].tolist()))
        expected = torch.arange(len(prefix), len(prefix) + length)
        if entry is not None and torch.equal(plan.suffix_positions[row, :length], expected):
            # suffix token j sits at position len(prefix) + j; the decode fed positions
            # prompt_length ... prompt_length + len(entry.rows) - 1
            first = max(entry.prompt_length - len(prefix), 0)
            stop = min(entry.prompt_length + len(entry.rows) - len(prefix), length)
            if first < stop:
                columns = torch.arange(first, stop)
                suffix_rows[row, columns] = entry.rows[len(prefix) - entry.prompt_length + columns]
                gather[offset + columns] = suffix_rows[row, columns]
                supplied[offset + columns] = True
        offset += length
    if not bool(supplied.any()):
        return None
    return SupplyPlan(gather, (~supplied).nonzero().flatten(), suffix_rows)


@contextlib.contextmanager
def supplying_linears(decoder: nn.Module, store: DecodeOutputs, supply: SupplyPlan) -> Iterator[int]:
    """Inside the block, each recorded layer's linears of `decoder` take their kept outputs for
    `supply`'s tokens; yields how many layers do."""
    switched: list[nn.Module] = []
    try:
        for index, layer in enumerate(decoder.layers):
            for path in store.linear_columns:
                source = store.source(index, path)
                linear = layer.get_submodule(path)
                if source is None or "forward" in vars(linear):
                    continue
                linear.forward = _supplied_forward(linear, source, supply)
                switched.append(linear)
        yield min(len(store.arena), len(decoder.layers)) if switched else 0
    finally:
        for linear in switched:
            del linear.forward


def _supplied_forward(linear: nn.Module, source: torch.Tensor, supply: SupplyPlan) -> Any:
    plain = type(linear).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        # the kept outputs are fp32 products of fp32 weights: under autocast, or for another
        # input, the linear computes as usual
        packed = x.dim() == 3 and x.shape[0] == 1 and x.shape[1] == len(supply.gather)
        if not packed or not x.dtype == linear.weight.dtype == source.dtype or torch.is_autocast_enabled(x.device.type):
            return plain(linear, x)
        return _SuppliedLinear.apply(x, linear.weight, linear.bias, source, supply.gather, supply.computed)

    return forward
