"""Run a group's shared prompt through the decoder once, not once per sample.

GRPO-style batches hold n samples of each prompt, so most of a short rollout's tokens are the
same prompt repeated n times. Here each distinct prompt runs once, its key/value cache (still
attached to the autograd graph) is copied to the rows that share it, and only the responses
run per row. Gradients flow back through the copies into the one prompt pass, so the update
is the one the plain forward gives, at a fraction of the cost when prompts are long next to
their responses.

The prefix of a row is everything before its last prompt token: that token's hidden state
predicts the first response token, so it runs with the response ("suffix"). The start that all
distinct prefixes share (a system prompt, a chat template's header) runs once before them, as
their "root". With `packed`, the suffixes run as one row of their real tokens
(`llmrl.train.packed_suffix`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from llmrl.algorithms.base import Batch
from llmrl.common_prefix import shared_start
from llmrl.train.packed_suffix import PackedSuffix


@dataclass
class PrefixPlan:
    rows: torch.Tensor  # [R] rows of the micro-batch with at least one policy token
    source: torch.Tensor  # [R] index of each row's prefix among the distinct prefixes
    root_ids: torch.Tensor  # [C] the start every distinct prefix shares (C may be 0)
    prefix_ids: torch.Tensor  # [U, W] distinct prefixes after the root, left-padded
    prefix_mask: torch.Tensor  # [U, W]
    suffix_start: torch.Tensor  # [R] column of the row where its suffix starts
    suffix_ids: torch.Tensor  # [R, S] right-padded
    suffix_mask: torch.Tensor  # [R, S]
    suffix_positions: torch.Tensor  # [R, S]
    suffix_loss_mask: torch.Tensor  # [R, S] loss_mask in suffix columns
    shape: tuple[int, int]  # [B, T] of the micro-batch

    def run_decoder(self, decoder: torch.nn.Module, packed: bool = False) -> torch.Tensor:
        """Suffix hidden states [R, S, H] (zero at padding when `packed`): prompt pass once per
        prefix, then the suffixes. `packed` needs the llmrl_grouped attention."""
        cache = DynamicCache()
        packed_index = self.suffix_mask.flatten().nonzero().flatten() if packed else None
        root_embeds, prefix_embeds, suffix_embeds = self._embed(decoder, packed_index)
        root = len(self.root_ids)
        if root:
            # An explicit causal mask, not none: with none, attention would take SDPA's causal kernel,
            # whose rounding differs from the masked path every other trainer pass takes (in bf16
            # that moved logprobs by 0.1 on the test model against the per-row forward).
            causal = torch.ones(root, root, dtype=torch.bool).tril()[None, None]
            decoder(inputs_embeds=root_embeds, attention_mask=causal, position_ids=torch.arange(root)[None], past_key_values=cache, use_cache=True)
            _copy_rows(cache, torch.zeros(len(self.prefix_ids), dtype=torch.long))
        prefix_positions = root + (self.prefix_mask.cumsum(-1) - 1).clamp(min=0)
        visible = self.visible_prefix()
        decoder(
            inputs_embeds=prefix_embeds, attention_mask=visible, position_ids=prefix_positions,
            past_key_values=cache, use_cache=True,
        )
        if packed_index is not None:
            return self._run_packed(decoder, cache, suffix_embeds, packed_index, visible)
        _copy_rows(cache, self.source)  # gradients add back into the prefix pass
        attention = torch.cat([visible[self.source], self.suffix_mask], dim=1)
        return decoder(
            inputs_embeds=suffix_embeds, attention_mask=attention, position_ids=self.suffix_positions,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state

    def _run_packed(
        self, decoder: torch.nn.Module, cache: DynamicCache, suffix_embeds: torch.Tensor, packed_index: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        prefix_layers = [(layer.keys, layer.values) for layer in cache.layers]
        suffix = PackedSuffix(prefix_layers, self.source, visible, self.suffix_mask, packed_index)
        positions = self.suffix_positions.flatten().index_select(0, packed_index).unsqueeze(0)
        with suffix.attending():
            hidden = decoder(inputs_embeds=suffix_embeds, position_ids=positions, use_cache=False).last_hidden_state
        if suffix.calls != len(prefix_layers):
            # a model whose attention bypasses llmrl_grouped would have run the suffixes without
            # their prompts: refuse rather than train on that
            raise RuntimeError(f"packed suffix pass: {suffix.calls} attention calls for {len(prefix_layers)} layers")
        return suffix.unpack(hidden)

    def visible_prefix(self) -> torch.Tensor:
        """[U, C + W]: the cache positions of each distinct prefix, root included, that hold tokens."""
        root = self.prefix_mask.new_ones(len(self.prefix_ids), len(self.root_ids))
        return torch.cat([root, self.prefix_mask], dim=1)

    def _embed(self, decoder: torch.nn.Module, packed_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Root, prefix and suffix token embeddings from one lookup. Each lookup's backward builds a
        dense vocabulary x hidden gradient (113 MB for SmolLM2) and autograd then adds the two:
        one lookup is one such tensor fewer to allocate, zero and add per micro-batch. With
        `packed_index` the suffix comes back as one row [1, N, H] of its real tokens."""
        suffix_ids = self.suffix_ids.flatten()
        if packed_index is not None:
            suffix_ids = suffix_ids.index_select(0, packed_index)
        ids = torch.cat([self.root_ids, self.prefix_ids.flatten(), suffix_ids])
        embeds = decoder.get_input_embeddings()(ids)
        root, prefix, suffix = embeds.split([len(self.root_ids), self.prefix_ids.numel(), len(suffix_ids)])
        suffix_shape = (1, len(suffix_ids)) if packed_index is not None else self.suffix_ids.shape
        return root.unsqueeze(0), prefix.view(*self.prefix_ids.shape, -1), suffix.view(*suffix_shape, -1)

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

    root = shared_start(list(distinct)) if len(distinct) > 1 else 0
    width = max(len(k) for k in distinct) - root
    prefix_ids = torch.zeros(len(distinct), width, dtype=input_ids.dtype)
    prefix_mask = torch.zeros(len(distinct), width, dtype=mb["attention_mask"].dtype)
    for key, index in distinct.items():
        prefix_ids[index, width - len(key) + root :] = torch.tensor(key[root:], dtype=input_ids.dtype)
        prefix_mask[index, width - len(key) + root :] = 1

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
        root_ids=torch.tensor(next(iter(distinct))[:root], dtype=input_ids.dtype),
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        suffix_start=torch.tensor(starts),
        suffix_ids=take(input_ids),
        suffix_mask=inside.to(mb["attention_mask"].dtype),
        suffix_positions=take(mb["position_ids"]),
        suffix_loss_mask=take(mb["loss_mask"]),
        shape=(B, T),
    )
