"""The recipe's `reward` section: which reward functions, their weights and settings, and how
their calls are run (timeout, fallback score, worker processes)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from llmrl.config_base import Section
from llmrl.reward.sandbox import SandboxSettings

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
        allow_inf_nan=False,
        description=(
            "Seconds one function may spend on one trajectory (finite, > 0). Past it the worker "
            "process is killed and replaced, and the call scores `fallback`. Not enforced when "
            "num_workers=0."
        ),
    )
    step_budget_s: float | None = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Seconds all reward calls of one training step may take together (every scoring round "
            "of the step counts). Calls not finished when it is spent score `fallback` without "
            "running (counted as `reward/over_budget`); busy workers are killed. null: no budget. "
            "With num_workers=0 it is checked between calls only."
        ),
    )
    abort_after_failing_steps: int = Field(
        3,
        ge=0,
        description=(
            "End the run (exit 2, naming the function and its first error) once one function has "
            "failed on every call for this many training steps in a row: a run that learns only "
            "from fallbacks is a lost run. 0 never aborts."
        ),
    )
    sandbox: bool = Field(
        True,
        description=(
            "Confine reward workers with operating-system mechanisms (docs/rewards.md, 'The "
            "reward sandbox'): own process group, private temp directory, read-only filesystem, "
            "no network, PID namespace, uid nobody, rlimits. What the privileges do not allow "
            "is logged and skipped. false: plain worker processes, for trusted rewards (faster "
            "worker start). Needs num_workers >= 1."
        ),
    )
    sandbox_user: Literal["auto", "nobody", "same"] = Field(
        "auto",
        description=(
            "Sandbox, trainer run as root: `nobody` runs workers as uid 65534 (RLIMIT_NPROC then "
            "applies, root-only files are out of reach); `same` keeps uid 0 with every capability "
            "dropped (reads what root can; cannot remount, reconfigure the network, or open devices "
            "beyond null/zero/full/random/urandom); `auto` picks nobody when the Python installation, "
            "sys.path and plugin files are readable by other users, else same."
        ),
    )
    memory_limit_mb: int | None = Field(
        4096,
        ge=1,
        description=(
            "Sandbox: address space (RLIMIT_AS) a reward worker may map beyond its size at start; "
            "past it allocations fail (MemoryError, scored `fallback`). null: no limit."
        ),
    )
    cpu_limit_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Sandbox: CPU seconds one call may use over all its threads (RLIMIT_CPU, rounded up "
            "to whole seconds); past it the worker is killed and the call scores `fallback`. "
            "null: timeout_s."
        ),
    )
    max_processes: int | None = Field(
        256,
        ge=1,
        description=(
            "Sandbox: RLIMIT_NPROC for reward workers, so a fork bomb stops here. The kernel "
            "counts it per user and does not apply it to root: it holds once workers run as "
            "uid nobody (the trainer runs as root); otherwise it counts the trainer's own "
            "processes too. null: no limit."
        ),
    )
    max_file_mb: int | None = Field(
        256,
        ge=1,
        description=(
            "Sandbox: largest file a reward may write (RLIMIT_FSIZE), and the size of the tmpfs "
            "that is its private directory (all its files together). null: no limit."
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

    def sandbox_settings(self) -> SandboxSettings | None:
        """The worker confinement this section asks for, or None when the sandbox is off."""
        if not self.sandbox:
            return None
        return SandboxSettings(
            memory_limit_mb=self.memory_limit_mb,
            cpu_limit_s=self.cpu_limit_s if self.cpu_limit_s is not None else self.timeout_s,
            max_processes=self.max_processes,
            max_file_mb=self.max_file_mb,
            user=self.sandbox_user,
        )

    def function_specs(self) -> list[RewardFunctionSpec]:
        """`functions` with bare strings turned into specs of weight 1."""
        return [RewardFunctionSpec(fn=item) if isinstance(item, str) else item for item in self.functions]
