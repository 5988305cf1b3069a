"""Controllers for the weight beta of a KL penalty placed in the reward (docs/formulas.md#kl-to-the-reference, docs/formulas.md#kl-in-the-reward).

`fixed` keeps `algorithm.kl_coef`. `adaptive` is the proportional controller of Ziegler et al.
2019, "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593, section 2.2), with the
batch-size step that verl's `AdaptiveKLController` uses:

    e      = clip(KL / kl_target - 1, -0.2, 0.2)
    beta  <- beta * (1 + e * n / kl_horizon)

where KL is the step's mean over trajectories of each trajectory's token-mean KL and n the
number of trajectories. The new beta applies from the next step on.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from llmrl.algorithms.aggregation import agg_denominator, agg_sum
from llmrl.registry import Registry


class KLController(Protocol):
    value: float

    def update(self, current_kl: float, n_trajectories: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    def __init__(self, cfg: Any) -> None:
        self.value = float(cfg.kl_coef)

    def update(self, current_kl: float, n_trajectories: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.target = float(cfg.kl_target)
        self.horizon = int(cfg.kl_horizon)

    def update(self, current_kl: float, n_trajectories: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_trajectories / self.horizon


KL_CONTROLLERS: Registry[Callable[[Any], KLController]] = Registry("KL controller")
KL_CONTROLLERS.register("fixed", FixedKLController)
KL_CONTROLLERS.register("adaptive", AdaptiveKLController)


def build_kl_controller(cfg: Any) -> KLController:
    return KL_CONTROLLERS[cfg.kl_controller](cfg)


def mean_sequence_kl(kl: torch.Tensor, loss_mask: torch.Tensor) -> float:
    """Mean over rows with policy tokens of the row's token-mean KL: the controller's input
    (the seq-mean-token-mean aggregation, which skips empty rows)."""
    rows = agg_denominator(loss_mask, "seq-mean-token-mean")
    return float(agg_sum(kl, loss_mask, "seq-mean-token-mean")) / rows if rows else 0.0
