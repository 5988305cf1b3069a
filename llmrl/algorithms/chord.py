"""CHORD's loss: SFT on expert rows mixed into an RL loss on the on-policy rows (Zhang et al. 2025,
"On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and Reinforcement
Learning via Dynamic Weighting", arXiv 2508.11408; the authors' Trinity-RFT `mix_chord`).

    L = (1 - mu(step)) * L_RL(on-policy rows) + mu(step) * L_SFT(expert rows)

L_RL is any registered policy loss (`algorithm.rl_loss`, PPO clip by default) computed on the
rows whose `expert_mask` is False; L_SFT is the negative log-likelihood of the expert tokens,
optionally weighted per token by phi(p) = p (1 - p) of the current policy (detached: a weight,
never differentiated). Each part is normalised over its own rows through the engine's
(sum, denominator) contract, so micro-batches and data-parallel ranks holding different shares
of expert rows make the same update as one pass over the whole mini-batch. The formulas and the
reference's defaults: docs/algorithms.md, "CHORD".
"""
from __future__ import annotations

import math
from typing import Any

import torch

from llmrl.algorithms.aggregation import agg_denominator, agg_sum
from llmrl.algorithms.base import Batch, LossContext, LossOutput
from llmrl.algorithms.losses import LOSSES, Metrics, register_loss


def mu_schedule(step: int, warmup_steps: int, decay_steps: int, peak: float, valley: float) -> float:
    """CHORD's global SFT weight at 0-based `step`: a linear warm-up from 0 to `peak` over
    `warmup_steps`, a cosine decay from `peak` to `valley` over `decay_steps`, then `valley`."""
    if step < warmup_steps:
        return step / warmup_steps * peak
    if step >= warmup_steps + decay_steps:
        return valley
    progress = (step - warmup_steps) / decay_steps
    return (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress)) + valley


def phi(p: torch.Tensor) -> torch.Tensor:
    """CHORD-phi's token weight p (1 - p): largest at p = 0.5, small where the policy is already
    sure of the expert token (p -> 1) and where it finds the token hopeless (p -> 0)."""
    return p * (1.0 - p)


def sft_token_losses(logp: torch.Tensor, use_phi: bool, cutoff_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token SFT loss -log p (times sg[phi(p)] with use_phi) and the phi values. A
    cutoff_prob below 1 clamps log p from above at log(cutoff_prob), so tokens the policy already
    gives more than that probability carry no gradient (Trinity's `cutoff_prob`)."""
    if cutoff_prob < 1.0:
        logp = logp.clamp(max=math.log(cutoff_prob))
    weights = phi(logp.detach().exp())
    nll = -logp
    return (nll * weights if use_phi else nll), weights


def _rows(mb: Batch, rows: torch.Tensor) -> Batch:
    """Rows `rows` ([B] bool) of every tensor in `mb` (per-row and per-token alike)."""
    return {k: v[rows] for k, v in mb.items()}


def _expert_rows(mb: Batch) -> torch.Tensor:
    expert = mb.get("expert_mask")
    return expert.bool() if expert is not None else torch.zeros(mb["input_ids"].shape[0], dtype=torch.bool)


@register_loss("chord")
class ChordLoss:
    """(1 - mu) x the `rl_loss` parts over on-policy rows + mu x part "sft" over expert rows."""

    def _rl_loss(self, cfg: Any) -> Any:
        return LOSSES[cfg.rl_loss]  # a policy-gradient loss: AlgorithmConfig refuses the others

    def on_policy_loss_name(self, cfg: Any) -> str:
        return cfg.rl_loss

    def gradient_outputs(self, cfg: Any) -> set[str]:
        of_rl = getattr(self._rl_loss(cfg), "gradient_outputs", None)
        return {"logprobs"} | (of_rl(cfg) if of_rl else {"logprobs", "entropy"})

    def denominators(self, mb: Batch, ctx: LossContext) -> dict[str, float]:
        expert = _expert_rows(mb)
        out: dict[str, float] = {}
        if bool((~expert).any()):
            out.update(self._rl_loss(ctx.cfg).denominators(_rows(mb, ~expert), ctx))
        if bool(expert.any()):
            out["sft"] = agg_denominator(mb["loss_mask"], ctx.cfg.sft_loss_agg_mode, rows=expert)
        return out

    def rows_with_gradient(self, mb: Batch, ctx: LossContext) -> torch.Tensor | None:
        """Expert rows always carry gradient; on-policy rows as the RL loss says."""
        expert = _expert_rows(mb)
        select = getattr(self._rl_loss(ctx.cfg), "rows_with_gradient", None)
        if select is None or not bool((~expert).any()):
            return None
        rl_keep = select(_rows(mb, ~expert), ctx)
        if rl_keep is None:
            return None
        keep = expert.clone()
        keep[~expert] = rl_keep
        return keep

    def skipped_row_metrics(self, mb: Batch, ctx: LossContext) -> Metrics:
        """Skipped rows are on-policy ones (expert rows always train): the RL loss's figures."""
        of_skipped = getattr(self._rl_loss(ctx.cfg), "skipped_row_metrics", None)
        metrics = dict(of_skipped(mb, ctx)) if of_skipped else {}
        if "actor/pg_loss" in metrics:
            metrics["chord/rl_loss"] = metrics["actor/pg_loss"]
        return metrics

    def __call__(self, mb: Batch, out: Batch, ctx: LossContext) -> LossOutput:
        cfg = ctx.cfg
        mu = mu_schedule(ctx.step, cfg.mu_warmup_steps, cfg.mu_decay_steps, cfg.mu_peak, cfg.mu_valley)
        expert = _expert_rows(mb)
        sums: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        metrics: Metrics = {"chord/mu": (mu, 1.0)}
        if bool((~expert).any()):
            rl = self._rl_loss(cfg)(_rows(mb, ~expert), _rows(out, ~expert), ctx)
            sums.update(rl.sums)
            weights.update({part: (1.0 - mu) * rl.weights.get(part, 1.0) for part in rl.sums})
            metrics.update(rl.metrics)
            if "actor/pg_loss" in rl.metrics:
                metrics["chord/rl_loss"] = rl.metrics["actor/pg_loss"]
        if bool(expert.any()):
            mask = mb["loss_mask"]
            token_loss, phis = sft_token_losses(out["logprobs"], cfg.sft_phi, cfg.sft_cutoff_prob)
            sums["sft"] = agg_sum(token_loss, mask, cfg.sft_loss_agg_mode, cfg.loss_scale_factor, rows=expert)
            weights["sft"] = mu
            valid = (mask > 0) & expert[:, None]
            metrics["chord/sft_loss"] = (float(sums["sft"].detach()), agg_denominator(mask, cfg.sft_loss_agg_mode, rows=expert))
            metrics["chord/phi_mean"] = (float(phis[valid].double().sum()), float(valid.sum()))
        for name, rows in (("expert", expert), ("policy", ~expert)):
            if "entropy" in out and bool(rows.any()):
                valid = (mb["loss_mask"] > 0) & rows[:, None]
                metrics[f"chord/entropy_{name}"] = (float(out["entropy"].detach()[valid].double().sum()), float(valid.sum()))
        return LossOutput(sums=sums, weights=weights, metrics=metrics)
