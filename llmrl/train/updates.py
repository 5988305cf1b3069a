"""The update phase of a step: the logprobs it needs before the policy moves, and `ppo_epochs`
passes of mini-batch optimizer steps on a TrainEngine (the policy's, or the critic's)."""
from __future__ import annotations

from typing import Any

import torch

from llmrl.algorithms.base import Batch, LossContext, LossFn
from llmrl.algorithms.config import needs_reference
from llmrl.batch import ROLLOUT_GAP, iter_mini_batches, rollout_gap_sums, select_rows
from llmrl.train.engine import TrainConfig, TrainEngine


def add_policy_logprobs(batch: Batch, trainer: TrainEngine, algo: Any, train: TrainConfig, need_old: bool) -> None:
    """Reference logprobs when a KL term needs them; old logprobs only when the update cannot
    take them from its own first forward (several epochs or mini-batches), or a stage reads them
    (`need_old`: a KL penalty in the reward)."""
    if needs_reference(algo):
        batch["ref_logprobs"] = trainer.forward(batch, {"logprobs"}, reference=True)["logprobs"]
    total = batch["input_ids"].shape[0]
    several_updates = algo.ppo_epochs > 1 or (train.mini_batch_size or total) < total
    if several_updates or need_old:
        batch["old_logprobs"] = trainer.forward(batch, {"logprobs"})["logprobs"]


def rollout_gap_metric(batch: Batch, policy: TrainEngine) -> dict[str, float]:
    """rollout/logprob_diff over every sampled token of the batch, against the batch's old
    logprobs, or the policy's no-grad forward when it has none; {} without sampled tokens."""
    trainer = batch["old_logprobs"] if "old_logprobs" in batch else policy.forward(batch, {"logprobs"})["logprobs"]
    total, tokens = rollout_gap_sums(batch, trainer)
    return {ROLLOUT_GAP: total / tokens} if tokens else {}


def run_updates(
    engine: TrainEngine, batch: Batch, loss_fn: LossFn, algo: Any, train: TrainConfig, seed: int, step: int, prefix: str
) -> dict[str, float]:
    """ppo_epochs passes of mini-batch optimizer steps, averaged; the engine's actor/* metrics
    are renamed to `prefix`/*. Mini-batches are shuffled with a per-step seed when there are
    several, so a resumed run replays them exactly."""
    rows = batch["input_ids"].shape[0]
    mini = train.mini_batch_size or rows
    shuffle = torch.Generator().manual_seed(seed * 7919 + step) if mini < rows else None
    ctx = LossContext(step=step - 1, cfg=algo, generator=torch.Generator().manual_seed(seed * 104729 + step))
    # rollout/logprob_diff, once a step over every sampled token, before the policy moves: from
    # the batch's old logprobs when it has them (several updates, or a stage read them), else
    # the single on-policy update measures it in its own forward (rows skipped for zero
    # advantage only under train.logprob_diff_skipped_rows: they would need a forward of their own).
    gap: dict[str, float] = {}
    if "logprobs" in getattr(loss_fn, "outputs", ("logprobs",)):
        if "old_logprobs" in batch:
            gap = rollout_gap_metric(batch, engine)
        else:
            ctx.measure_rollout_gap = True
    sums: dict[str, float] = {}
    count = 0
    for _ in range(algo.ppo_epochs):
        for mini_rows in iter_mini_batches(rows, mini, shuffle, strata=batch.get("expert_mask")):
            for k, v in engine.step(select_rows(batch, mini_rows), loss_fn, ctx).items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    averaged = {k: v / count for k, v in sums.items() if not k.startswith("rollout/")}
    averaged.update({k: v for k, v in sums.items() if k.startswith("rollout/")})
    averaged.update(gap)
    averaged["actor/updates"] = float(count)
    if prefix != "actor":
        averaged = {f"{prefix}/{k[len('actor/'):]}" if k.startswith("actor/") else k: v for k, v in averaged.items()}
    return averaged


def updates_per_run(steps: int, trajectories_per_step: int, algo: Any, mini_batch_size: int | None) -> int:
    """Optimizer steps over the run (the lr schedule's length): epochs x mini-batches x steps."""
    return steps * algo.ppo_epochs * (trajectories_per_step // (mini_batch_size or trajectories_per_step))
