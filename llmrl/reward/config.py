"""The recipe's `reward` section: which reward functions, their weights and settings, and how
their calls are run (timeout, fallback score, worker processes)."""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from llmrl.config_base import Section

# Keyword arguments the computer can supply. A function gets one only when its signature names it
# (or takes **kwargs), so the common `fn(completion, task)` stays valid.
OPTIONAL_KWARGS = ("trajectory", "finish_reason", "response")


class RewardFunctionSpec(Section):
    """One reward function in the recipe, with its weight and its own keyword arguments."""

    fn: str = Field(
        description=(
            "Which function: a registered name (`gsm8k`), `path/to/file.py:fn`, "
            "`package.module:fn`, or an entry point name in group `llmrl.rewards`."
        )
    )
    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        description="Multiplies this function's score in the weighted sum that drives advantages.",
    )
    name: str | None = Field(
        None,
        description=(
            "Name this component is logged under (reward parts and metrics). Default: the "
            "registered name, or the function name after the colon."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra keyword arguments passed to the function on every call, e.g. "
            "`{max_len: 1024, buffer_len: 256}` for `overlong`."
        ),
    )

    @field_validator("fn")
    @classmethod
    def _fn_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("fn must name a reward function")
        return value.strip()

    @field_validator("kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(set(value) & {"completion", "task", *OPTIONAL_KWARGS})
        if reserved:
            raise ValueError(f"kwargs may not set {reserved}: the reward computer passes them")
        return value

    @property
    def log_name(self) -> str:
        return self.name or self.fn.rpartition(":")[2]


class RewardConfig(Section):
    """The recipe's `reward` section."""

    functions: list[str | RewardFunctionSpec] = Field(
        default_factory=list,
        description=(
            "Reward functions summed by weight. Each item is a spec string (weight 1) or a mapping "
            "with fn/weight/name/kwargs. Empty: the data type's default reward (arithmetic → "
            "`arithmetic`, gsm8k → `gsm8k`, math → `math`)."
        ),
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds one function may spend on one trajectory. Past it the worker process is "
            "killed and replaced, and the call scores `fallback`. Not enforced when num_workers=0."
        ),
    )
    fallback: float = Field(
        0.0,
        allow_inf_nan=False,
        description=(
            "Score given to a component whose call raised, timed out, crashed its worker, or "
            "returned something other than a finite number or a dict with a finite `score`."
        ),
    )
    num_workers: int = Field(
        1,
        ge=0,
        description=(
            "Worker processes that run reward functions. 0 runs them in the calling process: no "
            "timeout and no crash isolation; meant for tests and debugging."
        ),
    )
    skip_after_timeouts: int = Field(
        3,
        ge=0,
        description=(
            "Once one function has timed out this many times within one scoring call, its "
            "remaining calls in that call score `fallback` without running (counted as "
            "`reward/skipped`), so a function that always hangs costs a few timeouts per step, "
            "not one per trajectory. 0 never skips."
        ),
    )

    def function_specs(self) -> list[RewardFunctionSpec]:
        """`functions` with bare strings turned into specs of weight 1."""
        return [RewardFunctionSpec(fn=item) if isinstance(item, str) else item for item in self.functions]
