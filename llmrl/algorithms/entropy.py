"""Entropy control for the policy loss: Clip-Cov and KL-Cov (docs/formulas.md#clip-cov-and-kl-cov).

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models" (arXiv 2505.22617; reference code PRIME-RL/Entropy-Mechanism-of-RL, ported to verl).
Entropy collapse is driven by tokens whose advantage and log-prob covary strongly; both methods
find those tokens by the per-token covariance

    Cov_{i,t} = (A_{i,t} - mean_valid(A)) * (logp_{i,t} - mean_valid(logp))

over the valid tokens of the current micro-batch (logp of the current policy, detached), and
restrain their update: Clip-Cov drops a random few from the gradient, KL-Cov adds a KL-like
penalty to the top few.

A control is registered by name (`algorithm.entropy_control`) and maps the policy loss's
per-token terms to the per-token loss that gets aggregated, plus metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from llmrl.registry import Registry

Metrics = dict[str, tuple[float, float]]


@dataclass
class PolicyTokenTerms:
    """Per-token pieces of the PPO surrogate an entropy control may recombine ([B,T] each)."""

    logp: torch.Tensor  # current policy, differentiable
    old_logp: torch.Tensor
    advantages: torch.Tensor  # 0 outside mask
    mask: torch.Tensor  # bool, valid (policy) tokens
    ratio: torch.Tensor  # exp(clamped logp - old_logp)
    unclipped: torch.Tensor  # -A * r
    loss: torch.Tensor  # the PPO clip loss (decoupled + dual clip) per token
    clipped: torch.Tensor  # bool: the clipped branch of max(-A r, -A clip(r)) is strictly larger


EntropyControl = Callable[[PolicyTokenTerms, Any, "torch.Generator | None"], tuple[torch.Tensor, Metrics]]

ENTROPY_CONTROLS: Registry[EntropyControl] = Registry("entropy control")


def register_entropy_control(name: str) -> Callable[[EntropyControl], EntropyControl]:
    return ENTROPY_CONTROLS.register(name)


def token_covariance(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_{i,t} of docs/formulas.md#token-covariance (detached); 0 outside the mask."""
    valid = mask.bool()
    a = advantages.detach().double()
    lp = logp.detach().double()
    if not valid.any():
        return torch.zeros_like(a)
    cov = (a - a[valid].mean()) * (lp - lp[valid].mean())
    return torch.where(valid, cov, torch.zeros_like(cov))


def _cov_metrics(cov: torch.Tensor, valid: torch.Tensor, affected: int) -> Metrics:
    n = float(valid.sum())
    if n == 0:
        return {}
    return {
        "entropy_ctl/cov_mean": (float(cov[valid].sum()), n),
        # engine reports sum/count over micro-batches: the mean of per-micro-batch maxima
        "entropy_ctl/cov_max": (float(cov[valid].max()), 1.0),
        "entropy_ctl/affected_frac": (float(affected), n),
    }


@register_entropy_control("none")
def no_control(terms: PolicyTokenTerms, cfg: Any, generator: torch.Generator | None) -> tuple[torch.Tensor, Metrics]:
    return terms.loss, {}


def clip_cov_selection(
    cov: torch.Tensor,
    valid: torch.Tensor,
    already_clipped: torch.Tensor,
    ratio: float,
    lower: float,
    upper: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip-Cov token choice (docs/formulas.md#clip-cov): among valid tokens not already clipped by PPO whose Cov lies
    strictly inside (lower, upper), a uniform random n = max(floor(ratio * N_valid), 1) of them
    (fewer when there are fewer candidates). Returns a [B,T] bool mask of the chosen tokens."""
    chosen = torch.zeros_like(valid, dtype=torch.bool)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return chosen
    candidates = valid & ~already_clipped & (cov > lower) & (cov < upper)
    where = candidates.flatten().nonzero().flatten()
    if where.numel() == 0:
        return chosen
    n = max(int(ratio * n_valid), 1)
    order = torch.randperm(where.numel(), generator=generator).to(where.device)
    picked = where[order[: min(n, where.numel())]]
    chosen.view(-1)[picked] = True
    return chosen


@register_entropy_control("clip_cov")
def clip_cov(terms: PolicyTokenTerms, cfg: Any, generator: torch.Generator | None) -> tuple[torch.Tensor, Metrics]:
    """Clip-Cov (docs/formulas.md#clip-cov): the chosen tokens' loss is set to 0, detaching them from the gradient.
    Applied on top of the PPO clip loss (with dual clip when configured)."""
    cov = token_covariance(terms.advantages, terms.logp, terms.mask)
    chosen = clip_cov_selection(
        cov, terms.mask, terms.clipped, cfg.clip_cov_ratio, cfg.clip_cov_lb, cfg.clip_cov_ub, generator
    )
    loss = torch.where(chosen, torch.zeros_like(terms.loss), terms.loss)
    return loss, _cov_metrics(cov, terms.mask, int(chosen.sum()))


def kl_cov_selection(cov: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """KL-Cov token choice (docs/formulas.md#kl-cov): the top k = max(1, floor(N_valid * ratio)) valid tokens by Cov.
    `ratio` is a FRACTION (verl `kl_cov_ratio`), not PRIME-RL's percent `k_percent`."""
    chosen = torch.zeros_like(valid, dtype=torch.bool)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return chosen
    k = min(max(int(n_valid * ratio), 1), n_valid)
    where = valid.flatten().nonzero().flatten()
    top = torch.topk(cov.flatten()[where], k).indices
    chosen.view(-1)[where[top]] = True
    return chosen


@register_entropy_control("kl_cov")
def kl_cov(terms: PolicyTokenTerms, cfg: Any, generator: torch.Generator | None) -> tuple[torch.Tensor, Metrics]:
    """KL-Cov (docs/formulas.md#kl-cov): every token uses the unclipped -A r (no PPO ratio clip, no dual clip); the
    chosen tokens add kappa * |logp - old_logp| with kappa = cfg.kl_cov_coef."""
    cov = token_covariance(terms.advantages, terms.logp, terms.mask)
    chosen = kl_cov_selection(cov, terms.mask, cfg.kl_cov_ratio)
    penalty = cfg.kl_cov_coef * (terms.logp - terms.old_logp).abs()
    loss = torch.where(chosen, terms.unclipped + penalty, terms.unclipped)
    metrics = _cov_metrics(cov, terms.mask, int(chosen.sum()))
    n = float(terms.mask.sum())
    if n:  # nothing is clipped under KL-Cov: overrides the PPO clip statistics
        metrics.update({"actor/clipfrac": (0.0, n), "actor/dual_clip_frac": (0.0, n)})
    return loss, metrics
