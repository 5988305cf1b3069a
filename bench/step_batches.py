"""Step batches for the update benches (update_speed.py, mfu.py): the right-padded layout that
llmrl.batch.collate makes, built from (prompt ids, response ids, advantage) rows."""
from __future__ import annotations

import torch


def pack_rows(rows: list[tuple[list[int], list[int], float]]) -> dict[str, torch.Tensor]:
    """One row per (prompt, response, advantage): the response tokens are the loss positions and
    carry the row's advantage; rollout logprobs are 0 (the benches time work, not ratios)."""
    width = max(len(p) + len(r) for p, r, _ in rows)
    B = len(rows)
    batch = {k: torch.zeros(B, width, dtype=torch.long) for k in ("input_ids", "attention_mask", "position_ids")}
    for key in ("loss_mask", "advantages", "rollout_logprobs"):
        batch[key] = torch.zeros(B, width)
    for i, (p, r, adv) in enumerate(rows):
        end = len(p) + len(r)
        batch["input_ids"][i, :end] = torch.tensor(p + r)
        batch["attention_mask"][i, :end] = 1
        batch["position_ids"][i, :end] = torch.arange(end)
        batch["loss_mask"][i, len(p) : end] = 1
        batch["advantages"][i, len(p) : end] = adv
    return batch
