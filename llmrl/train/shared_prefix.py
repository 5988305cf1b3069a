"""Run a group's shared prompt through the decoder once, not once per sample.

GRPO-style batches hold n samples of each prompt, so most of a short rollout's tokens are the
same prompt repeated n times. Here each distinct prompt runs once, its key/value cache (still
attached to the autograd graph) is copied to the rows that share it, and only the responses
run per row. Gradients flow back through the copies into the one prompt pass, so the update
is the one the plain forward gives, at a fraction of the cost when prompts are long next to
their responses.

The prefix of a row is everything before its last prompt token: that token's hidden state
predicts the first response token, so it runs with the response ("suffix").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from llmrl.algorithms.base import Batch


@dataclass
class PrefixPlan:
    rows: torch.Tensor  # [R] rows of the micro-batch with at least one policy token
    source: torch.Tensor  # [R] index of each row's prefix among the distinct prefixes
    prefix_ids: torch.Tensor  # [U, W] distinct prefixes, left-padded
    prefix_mask: torch.Tensor  # [U, W]
    suffix_start: torch.Tensor  # [R] column of the row where its suffix starts
    suffix_ids: torch.Tensor  # [R, S] right-padded
    suffix_mask: torch.Tensor  # [R, S]
    suffix_positions: torch.Tensor  # [R, S]
    suffix_loss_mask: torch.Tensor  # [R, S] loss_mask in suffix columns
    shape: tuple[int, int]  # [B, T] of the micro-batch

    def run_decoder(self, decoder: torch.nn.Module) -> torch.Tensor:
        """Suffix hidden states [R, S, H]: prompt pass once per prefix, then the suffixes."""
        cache = DynamicCache()
        prefix_embeds, suffix_embeds = self._embed(decoder)
        prefix_positions = (self.prefix_mask.cumsum(-1) - 1).clamp(min=0)
        decoder(
            inputs_embeds=prefix_embeds, attention_mask=self.prefix_mask, position_ids=prefix_positions,
            past_key_values=cache, use_cache=True,
        )
        _copy_rows(cache, self.source)  # gradients add back into the prefix pass
        attention = torch.cat([self.prefix_mask[self.source], self.suffix_mask], dim=1)
        return decoder(
            inputs_embeds=suffix_embeds, attention_mask=attention, position_ids=self.suffix_positions,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state

    def _embed(self, decoder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix and suffix token embeddings from one lookup. Each lookup's backward builds a
        dense vocabulary x hidden gradient (113 MB for SmolLM2) and autograd then adds the two:
        one lookup is one such tensor fewer to allocate, zero and add per micro-batch."""
        ids = torch.cat([self.prefix_ids.flatten(), self.suffix_ids.flatten()])
        embeds = decoder.get_input_embeddings()(ids)
        split = self.prefix_ids.numel()
        return embeds[:split].view(*self.prefix_ids.shape, -1), embeds[split:].view(*self.suffix_ids.shape, -1)

    def to_rows(self, suffix_values: torch.Tensor) -> torch.Tensor:
        """[R, S] values in suffix columns -> [B, T] token-aligned values (0 elsewhere)."""
        B, T = self.shape
        R, S = suffix_values.shape
        columns = self.suffix_start[:, None] + torch.arange(S)[None]
        wide = suffix_values.new_zeros(R, T + S).scatter(1, columns, suffix_values)
        return suffix_values.new_zeros(B, T).index_copy(0, self.rows, wide[:, :T])


def _copy_rows(cache: DynamicCache, source: torch.Tensor) -> None:
    """Every layer's keys and values to the rows `source` names: DynamicCache.batch_select_indices
    with index_select, whose backward is an index_add. The cache's own advanced indexing
    differentiates to an accumulating index_put, which took 5x as long on a CPU (bf16, 2 prefixes
    copied to 16 rows, forward and backward: 240 against 47 us a call)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, source)
        layer.values = layer.values.index_select(0, source)


def plan_shared_prefix(mb: Batch) -> PrefixPlan | None:
    """A plan when at least two rows share a prompt; None when sharing saves nothing."""
    input_ids, loss_mask = mb["input_ids"], mb["loss_mask"] > 0
    B, T = input_ids.shape
    lengths = mb["attention_mask"].sum(-1).tolist()
    has_policy = loss_mask.any(-1)
    first_policy = torch.where(has_policy, loss_mask.float().argmax(-1), torch.zeros_like(has_policy, dtype=torch.long))
    rows = has_policy.nonzero().flatten()
    if len(rows) < 2:
        return None
    starts = (first_policy[rows] - 1).tolist()  # the last prompt token runs with the response
    if min(starts) < 1:
        return None  # a row without a prompt to share
    distinct: dict[tuple[int, ...], int] = {}
    source = []
    for row, start in zip(rows.tolist(), starts):
        key = tuple(input_ids[row, :start].tolist())
        source.append(distinct.setdefault(key, len(distinct)))
    if len(distinct) == len(source):
        return None

    width = max(len(k) for k in distinct)
    prefix_ids = torch.zeros(len(distinct), width, dtype=input_ids.dtype)
    prefix_mask = torch.zeros(len(distinct), width, dtype=mb["attention_mask"].dtype)
    for key, index in distinct.items():
        prefix_ids[index, width - len(key) :] = torch.tensor(key, dtype=input_ids.dtype)
        prefix_mask[index, width - len(key) :] = 1

    suffix_lengths = [lengths[row] - start for row, start in zip(rows.tolist(), starts)]
    span = max(suffix_lengths)
    columns = torch.tensor(starts)[:, None] + torch.arange(span)[None]
    inside = torch.arange(span)[None] < torch.tensor(suffix_lengths)[:, None]
    clamped = columns.clamp(max=T - 1)

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.where(inside, x[rows].gather(1, clamped), torch.zeros_like(x[rows][:, :1]).expand(-1, span))

    return PrefixPlan(
        rows=rows,
        source=torch.tensor(source),
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        suffix_start=torch.tensor(starts),
        suffix_ids=take(input_ids),
        suffix_mask=inside.to(mb["attention_mask"].dtype),
        suffix_positions=take(mb["position_ids"]),
        suffix_loss_mask=take(mb["loss_mask"]),
        shape=(B, T),
    )
