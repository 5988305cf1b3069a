"""Loss aggregation modes (docs/formulas.md#loss-aggregation) split into a micro-batch SUM and DENOMINATOR.

The train engine (llmrl/algorithms/base.py) minimises  sum_over_micro(sum) / sum_over_micro(denominator)
for each loss part, with denominators summed over the whole mini-batch (and data-parallel ranks)
before the first backward. Each mode below is written so that this ratio equals the mode's
formula evaluated on the whole mini-batch, however the rows are split:

| mode                      | formula on the mini-batch            | micro sum                     | micro denominator   |
|---------------------------|--------------------------------------|-------------------------------|---------------------|
| token-mean                | sum m L / sum m                      | sum m L                       | sum m               |
| seq-mean-token-mean       | mean_i (sum_t m L / sum_t m)         | sum_i (sum_t m L / sum_t m)   | # non-empty rows    |
| seq-mean-token-sum        | mean_i sum_t m L                     | sum m L                       | # rows              |
| seq-mean-token-sum-norm   | sum m L / (B * C)   (TRL `dr_grpo`)  | sum m L / C                   | # rows              |

Reference choice for Dr. GRPO: verl divides by C only (not by B); that normaliser is the
mini-batch total divided by a constant, which cannot be expressed as a per-micro-batch
denominator share without knowing the micro-batch count, and its scale grows with batch size.
TRL's `dr_grpo` (sum / (B * max_completion_length)) fits the contract exactly and equals
token-mean whenever every row is full length, so llmrl uses TRL's convention.

Fully masked rows (an empty response) add nothing to any sum; they are excluded from the
seq-mean-token-mean denominator (their per-row mean is undefined) and counted as rows by the
token-sum modes, whose normaliser is meant to be independent of response lengths.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from llmrl.registry import Registry


class AggMode(Protocol):
    def sum(self, values: torch.Tensor, mask: torch.Tensor, scale_factor: float | None) -> torch.Tensor: ...

    def denominator(self, mask: torch.Tensor) -> float: ...


AGG_MODES: Registry[AggMode] = Registry("loss_agg_mode")


def register_agg_mode(name: str) -> Callable[[type], type]:
    """Class decorator: registers one instance of the class under `name`."""

    def register(cls: type) -> type:
        AGG_MODES.register(name, cls())
        return cls

    return register


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() rather than multiply: a non-finite value at a masked position must not leak NaN.
    return torch.where(mask > 0, values * mask, torch.zeros_like(values))


@register_agg_mode("token-mean")
class TokenMean:
    """verl default; TRL `dapo`/`bnpo`: every valid token of the mini-batch weighs the same."""

    def sum(self, values: torch.Tensor, mask: torch.Tensor, scale_factor: float | None) -> torch.Tensor:
        return _masked(values, mask).sum()

    def denominator(self, mask: torch.Tensor) -> float:
        return float(mask.sum())


@register_agg_mode("seq-mean-token-mean")
class SeqMeanTokenMean:
    """DeepSeekMath GRPO (TRL `grpo`): per-row token mean, then mean over non-empty rows."""

    def sum(self, values: torch.Tensor, mask: torch.Tensor, scale_factor: float | None) -> torch.Tensor:
        lengths = mask.sum(-1)
        per_row = _masked(values, mask).sum(-1) / lengths.clamp(min=1)
        return per_row.sum()

    def denominator(self, mask: torch.Tensor) -> float:
        return float((mask.sum(-1) > 0).sum())


@register_agg_mode("seq-mean-token-sum")
class SeqMeanTokenSum:
    """Per-row token sum, then mean over rows."""

    def sum(self, values: torch.Tensor, mask: torch.Tensor, scale_factor: float | None) -> torch.Tensor:
        return _masked(values, mask).sum()

    def denominator(self, mask: torch.Tensor) -> float:
        return float(mask.shape[0])


@register_agg_mode("seq-mean-token-sum-norm")
class SeqMeanTokenSumNorm:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) with TRL's normaliser: sum m L / (B * C)."""

    def sum(self, values: torch.Tensor, mask: torch.Tensor, scale_factor: float | None) -> torch.Tensor:
        if scale_factor is None or scale_factor <= 0:
            raise ValueError(
                "loss_agg_mode 'seq-mean-token-sum-norm' needs algorithm.loss_scale_factor > 0 "
                "(the loop fills it with rollout.max_new_tokens when unset)"
            )
        return _masked(values, mask).sum() / float(scale_factor)

    def denominator(self, mask: torch.Tensor) -> float:
        return float(mask.shape[0])


def _row_mask(mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return mask if rows is None else mask[rows.bool()]


def agg_sum(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    scale_factor: float | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's differentiable numerator of `mode` for per-token `values` [B,T].

    `rows` ([B] bool, optional) restricts the part to a subset of rows (e.g. CHORD's expert rows):
    the other rows count neither in the sum nor in the denominator.
    """
    if rows is not None:
        values, mask = values[rows.bool()], mask[rows.bool()]
    return AGG_MODES[mode].sum(values, mask, scale_factor)


def agg_denominator(mask: torch.Tensor, mode: str, rows: torch.Tensor | None = None) -> float:
    """This micro-batch's share of `mode`'s denominator, from the mask alone."""
    return AGG_MODES[mode].denominator(_row_mask(mask, rows))


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    scale_factor: float | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum / denominator on one batch (0 when nothing is valid): the mode's formula directly."""
    total = agg_sum(values, mask, mode, scale_factor, rows)
    denom = agg_denominator(mask, mode, rows)
    return total / denom if denom > 0 else total * 0.0
