"""Per-token KL estimators between a policy and the frozen reference (docs/formulas.md#kl-to-the-reference).

Every estimator maps (logp, ref) -> a [B,T] tensor, where `logp` is the log-prob of the sampled
token under the sampling-side policy (current policy for a loss term, old policy for a reward
term) and `ref` its log-prob under the reference. Naming follows John Schulman's note
"Approximating KL Divergence" (2020): k1 is the plain log-ratio, k2 half its square, k3 the
non-negative control-variate form.
"""
from __future__ import annotations

from typing import Callable

import torch

from llmrl.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def register_kl(*names: str) -> Callable[[KLEstimator], KLEstimator]:
    """Register an estimator under one or more names (verl's spelling as an alias)."""

    def register(fn: KLEstimator) -> KLEstimator:
        for name in names:
            KL_ESTIMATORS.register(name, fn)
        return fn

    return register


@register_kl("k1", "kl")
def kl_k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref: unbiased, high variance, can be negative per token."""
    return logp - ref


@register_kl("abs")
def kl_abs(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|logp - ref| (verl `abs`)."""
    return (logp - ref).abs()


@register_kl("k2", "mse")
def kl_k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (logp - ref)^2 (verl `mse`)."""
    return 0.5 * (logp - ref).square()


@register_kl("k3", "low_var_kl")
def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 (verl `low_var_kl`).

    As in verl, the log-ratio is clamped to [-20, 20] before the exponential and the result to
    [-10, 10], so a single token far off the reference cannot produce inf.
    """
    log_ratio = (ref - logp).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


def kl_penalty(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate by registered name (k1, k2, k3, abs, or verl's aliases)."""
    return KL_ESTIMATORS[estimator](logp, ref)


def kl_reward_channel(
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward channel `kl` = -beta * KL_t * m_t, so the token reward r_t = score_t - beta KL_t m_t
    (verl `apply_kl_penalty`; Ouyang et al. 2022), with KL of the old policy against the
    reference. Returns the channel and the per-token KL (an adaptive KL controller reads it)."""
    kl = kl_penalty(old_logprobs, ref_logprobs, estimator)
    return -(kl_coef * kl * loss_mask), kl
