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
their "root". With `packed`, root, prompts and suffixes run as one row of their real tokens
(`llmrl.train.packed_pass`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from llmrl.algorithms.base import Batch
from llmrl.common_prefix import shared_start
from llmrl.train.packed_pass import PackedPass


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
        """Suffix hidden states [R, S, H] (zero at padding when `packed`). `packed` runs root,
        prompts and suffixes as one row of their real tokens (`llmrl.train.packed_pass`; it
        needs the llmrl_grouped attention); otherwise the root, the prompts and the suffixes run
        as three decoder calls over one cache."""
        if packed:
            return self._run_packed(decoder)
        cache = DynamicCache()
        root_embeds, prefix_embeds, suffix_embeds = self._embed(decoder)
        root = len(self.root_ids)
        if root:
            # An explicit causal mask, not none: with none, attention would take SDPA's causal kernel,
            # whose rounding differs from the masked path every other trainer pass takes (in bf16
            # that moved logprobs by 0.1 on the test model against the per-row forward).
            causal = torch.ones(root, root, dtype=torch.bool).tril()[None, None]
            decoder(inputs_embeds=root_embeds, attention_mask=causal, position_ids=torch.arange(root)[None], past_key_values=cache, use_cache=True)
            _copy_rows(cache, torch.zeros(len(self.prefix_ids), dtype=torch.long))
        visible = self.visible_prefix()
        decoder(
            inputs_embeds=prefix_embeds, attention_mask=visible, position_ids=self.prefix_positions(),
            past_key_values=cache, use_cache=True,
        )
        _copy_rows(cache, self.source)  # gradients add back into the prefix pass
        attention = torch.cat([visible[self.source], self.suffix_mask], dim=1)
        return decoder(
            inputs_embeds=suffix_embeds, attention_mask=attention, position_ids=self.suffix_positions,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state

    def _run_packed(self, decoder: torch.nn.Module) -> torch.Tensor:
        root = len(self.root_ids)
        prompt_lengths = self.prefix_mask.sum(-1)
        prompt_real, suffix_real = self.prefix_mask > 0, self.suffix_mask > 0
        packed = PackedPass(root, prompt_lengths, self.source, suffix_real)
        # one lookup for every token of the pass: its backward builds one dense vocabulary-sized
        # gradient, not one per lookup plus their sum
        ids = torch.cat([self.root_ids, self.prefix_ids[prompt_real], self.suffix_ids[suffix_real]])
        embeds = decoder.get_input_embeddings()(ids).unsqueeze(0)
        positions = torch.cat([torch.arange(root), self.prefix_positions()[prompt_real], self.suffix_positions[suffix_real]])
        with packed.attending():
            hidden = decoder(inputs_embeds=embeds, position_ids=positions[None], use_cache=False).last_hidden_state
        layers = decoder.config.num_hidden_layers
        if packed.calls != layers:
            # a model whose attention bypasses llmrl_grouped would have run every token without
            # the others: refuse rather than train on that
            raise RuntimeError(f"packed pass: {packed.calls} attention calls for {layers} layers")
        return packed.suffixes(hidden)

    def prefix_positions(self) -> torch.Tensor:
        """[U, W]: each distinct prefix's token positions, counted on from the root (padding: the first)."""
        return len(self.root_ids) + (self.prefix_mask.cumsum(-1) - 1).clamp(min=0)

    def visible_prefix(self) -> torch.Tensor:
        """[U, C + W]: the cache positions of each distinct prefix, root included, that hold tokens."""
        root = self.prefix_mask.new_ones(len(self.prefix_ids), len(self.root_ids))
        return torch.cat([root, self.prefix_mask], dim=1)

    def _embed(self, decoder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Root, prefix and suffix token embeddings from one lookup. Each lookup's backward builds a
        dense vocabulary x hidden gradient (113 MB for SmolLM2) and autograd then adds the two:
        one lookup is one such tensor fewer to allocate, zero and add per micro-batch."""
        ids = torch.cat([self.root_ids, self.prefix_ids.flatten(), self.suffix_ids.flatten()])
        embeds = decoder.get_input_embeddings()(ids)
        root, prefix, suffix = embeds.split([len(self.root_ids), self.prefix_ids.numel(), self.suffix_ids.numel()])
        return root.unsqueeze(0), prefix.view(*self.prefix_ids.shape, -1), suffix.view(*self.suffix_ids.shape, -1)

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
