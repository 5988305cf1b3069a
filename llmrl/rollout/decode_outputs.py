"""The hf engine's decode outputs, kept for the update that trains on the same rollout.

An on-policy step trains on the rollout it just sampled, with the weights that sampled it (until
its first optimizer step). The update's forward then recomputes, for every token the decode fed
back, each decoder linear's output: the same weights times the same inputs as in the decode.
At the vs_trl shape those products are about a quarter of the update (docs/benchmarks.md). So,
in one process, the fused decode step (llmrl/rollout/fused_decode.py) writes each layer's four
products (q|k|v, o, gate|up, down) of each fed token into an arena, with the head's logits for
the token after it, and the trainer's packed pass and head pass take them from there instead of
multiplying (llmrl/train/supplied_linears.py, llmrl/train/logprobs.py). Each linear's backward
still runs in full, from the trainer's own inputs.

What makes a kept output the one the trainer would compute:
- The tokens: an entry is keyed by its whole token sequence (prompt and completion), so only a
  row that holds exactly what was decoded, at the same positions, finds one; a row with other
  tokens (a multi-turn episode with tool output, a trimmed completion) is recomputed.
- The weights: when a training rollout starts, the rollout model's weights are compared with
  the trainer's, bit for bit; the parameters' version counters at that moment are the entries'
  stamp. A write to any parameter of either model (an optimizer step, a weight sync) bumps a
  counter, and from then on every entry is stale and nothing is supplied.
The products themselves round differently from the trainer's (other kernels, other summation
orders), so a supplied output equals the computed one to fp32 rounding, not to the bit.

Memory: 4 bytes x (the layers' summed output widths x layers + the vocabulary) per fed token; for
SmolLM2-135M (5,184 x 30 + 49,152) 0.82 MB, 3.4 GB at vs_trl's 32 rows of 128 tokens. The arena is
kept from step to step (its pages are not faulted in again) and bounded by
rollout.reuse_decode_outputs_mb; a rollout that would not fit keeps no logits and the first layers
that do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("llmrl.rollout")


@dataclass(frozen=True)
class Entry:
    """Where one decoded row's outputs are: arena rows `rows[t]` for the fed token at position
    `prompt_length + t` (all of the completion's tokens but the last were fed)."""

    rows: torch.Tensor
    prompt_length: int


class DecodeRecord:
    """One generated batch being recorded: `at_step` names the live rows before each decode step,
    `keep` takes a product's output [live rows, width] of one layer.

    Step-major: step t's live rows fill one block of consecutive arena rows, in the order the
    step holds them, so a product's output is one copy into contiguous rows (on 2 cores, first
    writes into fresh pages took 2.2 s a vs_trl rollout this way, against 4.0 s with each
    sequence's rows together, and 0.56 against 0.68 s warm)."""

    def __init__(self, store: DecodeOutputs, prompts: list[list[int]], start: int, room: int) -> None:
        self.store, self.prompts, self.start = store, prompts, start
        self.slots = torch.full((len(prompts), room), -1, dtype=torch.long)
        self.block = slice(start, start)

    def at_step(self, rows: list[int], step: int) -> None:
        first = self.start + step * len(self.prompts)
        self.block = slice(first, first + len(rows))
        self.slots[rows, step] = torch.arange(first, first + len(rows))

    def keep(self, layer: int, product: int, values: torch.Tensor) -> None:
        if layer < len(self.store.views):
            self.store.views[layer][product][self.block].copy_(values)

    def keep_logits(self, logits: torch.Tensor) -> None:
        """The head's logits [live rows, vocab] of the step: the fed tokens' next-token logits."""
        if self.store.logits is not None:
            self.store.logits[self.block].copy_(logits)

    def finish(self, completions: list[list[int]]) -> None:
        """Index the batch's rows by their tokens (a completion of t tokens fed t - 1 of them)."""
        for row, (prompt, completion) in enumerate(zip(self.prompts, completions)):
            if len(completion) > 1:
                entry = Entry(self.slots[row, : len(completion) - 1], len(prompt))
                self.store.entries[tuple(prompt) + tuple(completion)] = entry


class DecodeOutputs:
    """The arena and index of kept decode outputs shared by an hf rollout engine and the torch
    train engine in the same process (`link_decode_outputs`).

    `products`: a layer's products in the order the fused step computes them, each as the linears
    it packs (their paths inside the layer) with their output widths.
    """

    def __init__(self, rollout_model: nn.Module, trainer: Any, products: list[list[tuple[str, int]]], budget_bytes: int) -> None:
        trainer_model = trainer.model
        rollout_params = dict(rollout_model.named_parameters())
        self.pairs = [(rollout_params[name], param) for name, param in trainer_model.named_parameters()]
        self.trainer, self.trainer_model = trainer, trainer_model
        # The frozen reference (a KL term's) equals the policy until the first update; while it
        # equals the rollout too, its passes take the kept outputs as well, so that reference and
        # old logprobs still agree to the bit (a KL of exactly 0 before any update).
        self.reference: nn.Module | None = getattr(trainer, "reference", None)
        reference = dict(self.reference.named_parameters()) if self.reference is not None else {}
        self.reference_pairs = [
            (rollout_params[name], reference[name]) for name, param in trainer_model.named_parameters()
            if name in reference and reference[name].dtype == param.dtype and reference[name].shape == param.shape
        ]
        self.reference_matches = False
        self.layer_count = int(trainer_model.config.num_hidden_layers)
        self.dtype = next(rollout_model.parameters()).dtype
        self.budget_bytes = budget_bytes
        # column span of each product and of each linear in a layer's row of outputs
        self.product_columns: list[tuple[int, int]] = []
        self.linear_columns: dict[str, tuple[int, int]] = {}
        column = 0
        for linears in products:
            first = column
            for path, width in linears:
                self.linear_columns[path] = (column, column + width)
                column += width
            self.product_columns.append((first, column))
        self.width = column
        self.vocab = int(rollout_model.get_output_embeddings().weight.shape[0])
        self.arena: list[torch.Tensor] = []  # per recorded layer: [capacity, width]
        # [capacity, vocab]: the head's logits, kept when every layer fits the budget with them
        self.logits: torch.Tensor | None = None
        self.views: list[list[torch.Tensor]] = []  # per recorded layer, per product: a column view
        self.used = 0
        self.entries: dict[tuple[int, ...], Entry] = {}
        self.stamp: tuple[int, ...] | None = None  # version counters when the weights last matched

    # ------------------------------------------------------------------ rollout side
    def begin(self, prompts: list[list[int]], room: int) -> DecodeRecord | None:
        """A record for a batch of `prompts` decoding up to `room` tokens each, or None when the
        weights differ from the trainer's or not even one layer fits the budget."""
        if not self._weights_current():
            self._drop_entries()
            if not self._weights_match():
                return None
        rows = len(prompts) * room
        layers = self._reserve(self.used + rows)
        if not layers:
            return None
        record = DecodeRecord(self, prompts, self.used, room)
        self.used += rows
        return record

    def _reserve(self, capacity: int) -> int:
        """Room for `capacity` rows in as many layers as the budget allows, and for the logits
        when all layers fit with them; returns the layer count (0: none, and the arena is left as
        it is). While entries are kept nothing is added: theirs would be missing there."""
        capacity = max(capacity, self.arena[0].shape[0] if self.arena else 0)
        item = torch.empty(0, dtype=self.dtype).element_size()
        layer_bytes, logits_bytes = capacity * self.width * item, capacity * self.vocab * item
        layers = min(self.budget_bytes // layer_bytes, len(self.arena) if self.used else self.layer_count)
        if not layers:
            return 0
        with_logits = layers == self.layer_count and layers * layer_bytes + logits_bytes <= self.budget_bytes
        if self.used and self.logits is None:
            with_logits = False
        del self.arena[layers:]
        if not with_logits:
            self.logits = None
        for index, buffer in enumerate(self.arena):  # in place: one layer's extra copy at most
            self.arena[index] = self._grown(buffer, capacity)
        while len(self.arena) < layers:
            self.arena.append(torch.empty(capacity, self.width, dtype=self.dtype))
        if with_logits:
            self.logits = self._grown(self.logits, capacity) if self.logits is not None else torch.empty(capacity, self.vocab, dtype=self.dtype)
        self.views = [[buffer[:, a:b] for a, b in self.product_columns] for buffer in self.arena]
        return layers

    def _grown(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        """`buffer` with room for `capacity` rows, its used rows kept."""
        if buffer.shape[0] >= capacity:
            return buffer
        grown = buffer.new_empty(capacity, buffer.shape[1])
        grown[: self.used].copy_(buffer[: self.used])
        return grown

    # ------------------------------------------------------------------ trainer side
    def current_entries(self, model: nn.Module) -> dict[tuple[int, ...], Entry]:
        """The entries that hold what `model` computes now: all of them when `model` is the
        linked trainer's (or its reference, while that equals the rollout) and no weight of
        either model has changed since they were recorded."""
        if not self.entries or (model is not self.trainer_model and model is not self.reference):
            return {}
        if not self._weights_current():
            self._drop_entries()
            return {}
        if model is self.reference and not self.reference_matches:
            return {}
        return self.entries

    def source(self, layer: int, linear: str) -> torch.Tensor | None:
        """The kept outputs of one linear of one layer, [arena rows, its width]; None when that
        layer or linear is not recorded."""
        if layer >= len(self.arena) or linear not in self.linear_columns:
            return None
        start, stop = self.linear_columns[linear]
        return self.arena[layer][:, start:stop]

    # ------------------------------------------------------------------ weights
    def _versions(self) -> tuple[int, ...]:
        # A weight sync or a checkpoint load writes with copy_, which bumps a tensor's version
        # counter; torch's fused AdamW step does not (torch 2.x), so the trainer's count of
        # optimizer steps is part of the stamp.
        pairs = self.pairs + self.reference_pairs
        return (int(self.trainer.updates), *(t._version for pair in pairs for t in pair))

    def _weights_current(self) -> bool:
        return self.stamp is not None and self.stamp == self._versions()

    def _weights_match(self) -> bool:
        # Read as one pass over both models (0.08 s for SmolLM2-135M on 2 cores), once per
        # rollout after the weights moved.
        same = all(torch.equal(ours, theirs) for ours, theirs in self.pairs)
        self.stamp = self._versions() if same else None
        # after the first update this stops at the first weight that moved
        self.reference_matches = same and len(self.reference_pairs) == len(self.pairs) and all(
            torch.equal(ours, theirs) for ours, theirs in self.reference_pairs
        )
        return same

    def _drop_entries(self) -> None:
        self.entries.clear()
        self.used = 0


def link_decode_outputs(rollout: object, trainer: object, budget_mb: int) -> str | None:
    """Share a `DecodeOutputs` between an hf rollout engine with the fused decode step and a
    torch train engine in this process; returns why they cannot share one (None: linked)."""
    from llmrl.models import is_lora
    from llmrl.rollout.hf import HFRolloutEngine
    from llmrl.train.torch_engine import TorchTrainEngine

    if budget_mb <= 0:
        return "rollout.reuse_decode_outputs_mb is 0"
    if not isinstance(rollout, HFRolloutEngine) or rollout.fused_decode is None:
        return "the rollout engine is not hf with the fused decode step"
    if type(trainer) is not TorchTrainEngine:
        return "the train engine is not the torch backend"
    if not trainer.cfg.shared_prompt_forward or not trainer._packs_responses(trainer.model) or getattr(trainer.model, "is_gradient_checkpointing", False):
        return "the trainer does not run the packed pass (train.shared_prompt_forward, train.packed_responses, no gradient checkpointing)"
    if is_lora(trainer.model):
        return "the policy trains a LoRA adapter (the rollout holds merged weights)"
    if trainer.precision != "fp32" or next(rollout.model.parameters()).dtype != torch.float32:
        return "the trainer or the rollout is not fp32"
    rollout_params = dict(rollout.model.named_parameters())
    for name, param in trainer.model.named_parameters():
        theirs = rollout_params.get(name)
        if theirs is None or theirs.shape != param.shape:
            return f"the rollout model has no weight {name} of shape {tuple(param.shape)}"
    store = DecodeOutputs(rollout.model, trainer, rollout.fused_decode.layer_products(), budget_mb << 20)
    rollout.decode_outputs = store
    trainer.decode_outputs = store
    return None
