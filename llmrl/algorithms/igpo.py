"""IGPO's turn-level advantage (Wang et al. 2025, "Information Gain-based Policy Optimization",
arXiv 2510.14967; docs/formulas.md#igpo-advantage).

Every assistant turn but the last has an information-gain reward (channel `info_gain`, at the
turn's last token, written by the multi_turn workflow); the last turn has the outcome reward
(channel `outcome`: F1 with a format penalty). Per group (prompt):
  1. normalise: (x - mean) / (std + adv_eps), std the population std sqrt(mean((x - mean)^2) + 1e-8),
     and std = 1 for a pool of one. `igpo_norm_mode: separate` (the default, as the authors'
     train.sh) keeps one pool for IG rewards and one for outcomes; an IG of exactly 0 is left out
     of its pool and normalises to 0, as in the reference code. `joint` pools them all.
     `norm_adv_by_std: false` only centres.
  2. accumulate over turns: A_T = r_T, A_k = r_k + gamma * A_{k+1}.
  3. broadcast A_k over the policy tokens of turn k.
Turns are read from `turn_ids`, not guessed from where rewards are non-zero (the reference code
detects turn ends as non-zero normalised rewards, which merges a turn whose normalised reward is
exactly 0 into the next one; with gamma = 1 the two agree, with gamma < 1 ours discounts that turn
once more).
"""
from __future__ import annotations

import math

import torch

from llmrl.algorithms.advantages import register_advantage, token_metrics
from llmrl.algorithms.base import AdvantageInputs

INFO_GAIN, OUTCOME = "info_gain", "outcome"


def population_stats(values: list[float]) -> tuple[float, float]:
    """(mean, std) as the IGPO code computes them: std = sqrt(mean((x - mean)^2) + 1e-8), 1 for n <= 1."""
    if not values:
        return 0.0, 1.0
    mean = sum(values) / len(values)
    if len(values) <= 1:
        return mean, 1.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / len(values) + 1e-8)


def _row_turns(turn_ids: torch.Tensor | None, mask: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The turn ids that hold policy tokens, in order, and the row's turn id per token."""
    row_turns = turn_ids if turn_ids is not None else torch.zeros_like(mask, dtype=torch.long)
    return sorted(set(row_turns[mask > 0].tolist())), row_turns


@register_advantage("igpo")
def igpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = inputs.cfg
    mask = inputs.loss_mask
    outcome = inputs.rewards.get(OUTCOME, torch.zeros_like(mask))
    gains = inputs.rewards.get(INFO_GAIN, torch.zeros_like(mask))
    separate = cfg.igpo_norm_mode == "separate"

    # raw turn rewards per row: IG for every turn but the last, the outcome for the last
    # (turns, IG per non-final turn, outcome, the row's turn id per token)
    rows: list[tuple[list[int], list[float], float, torch.Tensor]] = []
    for i in range(mask.shape[0]):
        turns, row_turns = _row_turns(None if inputs.turn_ids is None else inputs.turn_ids[i], mask[i])
        ig = [float(gains[i][row_turns == k].sum()) for k in turns[:-1]]
        rows.append((turns, ig, float(outcome[i].sum()), row_turns))

    advantages = torch.zeros_like(mask, dtype=torch.float32)
    group_ids = inputs.group_ids.tolist()
    nonzero_groups, outcome_nonzero, n_groups = 0, 0, 0
    ig_values: list[float] = []
    for gid in sorted(set(group_ids)):
        members = [i for i, g in enumerate(group_ids) if g == gid and rows[i][0]]
        n_groups += 1
        finals = [rows[i][2] for i in members]
        igs = [x for i in members for x in rows[i][1]]
        ig_values.extend(igs)
        outcome_nonzero += len(set(finals)) > 1
        if separate:
            ig_stats = population_stats([x for x in igs if x != 0.0])
            final_stats = population_stats(finals)
        else:
            ig_stats = final_stats = population_stats(igs + finals)

        def normalise(x: float, stats: tuple[float, float]) -> float:
            centred = x - stats[0]
            return centred / (stats[1] + cfg.adv_eps) if cfg.norm_adv_by_std else centred

        any_nonzero = False
        for i in members:
            turns, ig, final, row_turns = rows[i]
            scaled = [0.0 if (separate and x == 0.0) else normalise(x, ig_stats) for x in ig] + [normalise(final, final_stats)]
            running = 0.0
            for k, r in reversed(list(zip(turns, scaled))):
                running = r + cfg.gamma * running
                tokens = (row_turns == k) & (mask[i] > 0)
                advantages[i][tokens] = running
                any_nonzero |= running != 0.0
        nonzero_groups += any_nonzero
    metrics = {
        **token_metrics(advantages, mask),
        "adv/nonzero_groups": nonzero_groups / max(n_groups, 1),
        "igpo/outcome_nonzero_groups": outcome_nonzero / max(n_groups, 1),
        "igpo/ig_mean": sum(ig_values) / len(ig_values) if ig_values else 0.0,
        "igpo/ig_turns": float(len(ig_values)),
    }
    return advantages, metrics
