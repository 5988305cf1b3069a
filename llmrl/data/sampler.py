"""Draws a fixed number of prompts per RL step, epoch after epoch, resumable exactly."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from llmrl.types import Task


class PromptSampler:
    """Cycles through `tasks` in batches of `prompts_per_step`.

    Epoch e's order is a pure function of (seed, e), so the sampler's whole state is two
    integers: a resumed run reloads them and draws exactly the prompts an uninterrupted run
    would. A batch that runs past the end of an epoch continues into the next one, so every
    batch has the same size.
    """

    def __init__(
        self, tasks: Sequence[Task], prompts_per_step: int, seed: int, shuffle: bool = True
    ) -> None:
        if not tasks:
            raise ValueError("PromptSampler needs at least one task")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.tasks = list(tasks)
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.tasks)))
        if self.shuffle:
            # A string seed is hashed deterministically, unlike hash() of a tuple.
            random.Random(f"llmrl-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[Task]:
        batch: list[Task] = []
        while len(batch) < self.prompts_per_step:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._order_for(self.epoch)
            batch.append(self.tasks[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_tasks": len(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different task count means a different dataset: the saved position would be wrong.
        if state["num_tasks"] != len(self.tasks):
            raise ValueError(
                f"sampler state is for {state['num_tasks']} tasks, this run has {len(self.tasks)}"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._order_for(self.epoch)
