"""RewardComputer: scores a batch of trajectories with the configured reward functions, in worker
processes or in-process, combines them by weight, and records failure counters as metrics."""
from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llmrl.reward.config import OPTIONAL_KWARGS, RewardConfig, RewardFunctionSpec
from llmrl.reward.pool import _Call, _Outcome, _run_reward, _WorkerPool, probe_import
from llmrl.reward.registry import (
    WARM_UP_ATTR,
    RewardConfigError,
    RewardFn,
    _canonical_spec,
    default_reward_for_kind,
    needs_import,
    resolve_reward,
)
from llmrl.types import Trajectory

logger = logging.getLogger("llmrl.reward")  # the name the reward module has always logged under

# The accuracy part; the key DAPO's dynamic-sampling filter reads (DAPO: Yu et al. 2025,
# arXiv 2503.14476).
ACC_KEY = "acc"


class RewardFailingError(RewardConfigError):
    """A reward function failed on every call for `reward.abort_after_failing_steps` steps in a
    row; the message names it and its first error."""


@dataclass
class _Streak:
    """One component's run of training steps in which every call failed."""

    steps: int = 0  # completed steps in a row with no successful call
    calls: int = 0  # calls in the current step
    ok: bool = False  # any successful call in the current step
    first_error: str = ""  # the first failure of the streak

    def end_step(self) -> None:
        if self.calls:
            self.steps = 0 if self.ok else self.steps + 1
            if self.ok:
                self.first_error = ""
        self.calls, self.ok = 0, False


@dataclass
class RewardResult:
    score: float  # weighted sum of the components' scores
    parts: dict[str, float] = field(default_factory=dict)  # per component, plus `acc` if given
    failed: int = 0  # components that scored the fallback


@dataclass(frozen=True)
class _Component:
    spec: str  # canonical: resolvable inside a worker process
    log_name: str
    weight: float
    kwargs: dict[str, Any]
    wanted: frozenset[str]  # which OPTIONAL_KWARGS the signature asks for


def _signature_wants(fn: RewardFn) -> tuple[frozenset[str], inspect.Signature | None]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return frozenset(), None
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return frozenset(OPTIONAL_KWARGS), signature
    return frozenset(name for name in OPTIONAL_KWARGS if name in signature.parameters), signature


def _build_component(spec: RewardFunctionSpec) -> _Component:
    fn = resolve_reward(spec.fn)
    wanted, signature = _signature_wants(fn)
    if signature is not None:
        # Binding placeholders catches a bad signature or a missing required kwarg now, with the
        # component's name, instead of as one fallback per trajectory later.
        try:
            signature.bind("", None, **{name: None for name in [*spec.kwargs, *wanted]})
        except TypeError as exc:
            raise RewardConfigError(
                f"reward {spec.log_name!r} ({spec.fn}) cannot be called as "
                f"fn(completion, task, **kwargs) with kwargs {sorted(spec.kwargs)}: {exc}"
            ) from exc
    return _Component(_canonical_spec(spec.fn), spec.log_name, spec.weight, dict(spec.kwargs), wanted)


def _call_kwargs(component: _Component, trajectory: Trajectory) -> dict[str, Any]:
    kwargs = dict(component.kwargs)
    if "trajectory" in component.wanted:
        kwargs["trajectory"] = trajectory
    if "finish_reason" in component.wanted:
        kwargs["finish_reason"] = trajectory.finish_reason
    if "response" in component.wanted:
        kwargs["response"] = response_text(trajectory)
    return kwargs


def response_text(trajectory: Trajectory) -> str:
    """What the grader sees as the whole answer: POPE's guidance prefix plus the completion."""
    guidance = trajectory.task.meta.get("guidance_text")
    if trajectory.guided and guidance:
        return str(guidance) + trajectory.completion_text
    return trajectory.completion_text


def check_reward_imports(cfg: RewardConfig) -> list[tuple[int, str]]:
    """(index in `functions`, error) for each spec that cannot be resolved. Plugin specs (files,
    modules, entry points) are imported in a throwaway worker confined like the run's, so a
    plugin that exits or crashes while it is imported is an error here, at `llmrl validate`,
    and never ends this process."""
    errors = []
    for index, spec in enumerate(cfg.function_specs()):
        if needs_import(spec.fn):
            error = probe_import(_canonical_spec(spec.fn), cfg.sandbox_settings())
        else:
            error = None
        if error:
            errors.append((index, f"{spec.fn}: {error}" if spec.fn not in error else error))
    return errors


# ---------------------------------------------------------------- the computer


class RewardComputer:
    """Scores trajectories with the configured reward functions; never raises for user code."""

    def __init__(self, cfg: RewardConfig, default_kind: str | None = None) -> None:
        self.cfg = cfg
        specs = cfg.function_specs()
        if not specs:
            if default_kind is None:
                raise RewardConfigError(
                    "reward.functions is empty and the data type is unknown; list a reward"
                )
            specs = [RewardFunctionSpec(fn=default_reward_for_kind(default_kind))]
        self.components = [_build_component(spec) for spec in specs]
        self._check_log_names()
        # In-process mode calls the resolved functions directly; workers resolve from the spec.
        self._functions = [resolve_reward(component.spec) for component in self.components]
        self._pool: _WorkerPool | None = None
        self._metrics: dict[str, float] = {}
        self._streaks = [_Streak() for _ in self.components]
        self._in_training = False  # begin_step called: steps exist, so budgets and aborts apply per step
        self._budget_end: float | None = None

    def begin_step(self, step: int) -> None:
        """Called by the training loop before each step's first scoring: closes the previous
        step's failure accounting and starts this step's time budget (reward.step_budget_s)."""
        for streak in self._streaks:
            streak.end_step()
        self._in_training = True
        self._budget_end = self._budget_from_now()

    @property
    def sandbox_guarantees(self) -> dict[str, str]:
        """Which sandbox guarantees the workers have ("on", or why not); empty before the first
        worker starts or with the sandbox off."""
        return dict(self._pool.guarantees) if self._pool is not None else {}

    @property
    def names(self) -> list[str]:
        return [component.log_name for component in self.components]

    def score(self, trajectories: list[Trajectory]) -> list[RewardResult]:
        start = time.perf_counter()
        calls = [
            _Call(
                index * len(self.components) + position,
                position,
                trajectory.completion_text,
                trajectory.task,
                _call_kwargs(component, trajectory),
            )
            for index, trajectory in enumerate(trajectories)
            for position, component in enumerate(self.components)
        ]
        restarts = 0
        # Outside training (evaluation) every scoring call is a step of its own for the budget.
        budget_end = self._budget_end if self._in_training else self._budget_from_now()
        if self.cfg.num_workers == 0:
            outcomes = self._run_in_process(calls, budget_end)
        else:
            outcomes, restarts = self._run_in_pool(calls, budget_end)
        results = self._combine(len(trajectories), outcomes)
        self._record_metrics(outcomes, restarts, time.perf_counter() - start)
        self._track_failures(outcomes)
        return results

    def start(self) -> None:
        """Fork the reward workers now (with reward.num_workers >= 1; otherwise nothing to start).
        The training loop calls this before it loads a model, so that the workers hold only what
        the process held then: see `_WorkerPool.start`."""
        if self.cfg.num_workers > 0 and self._pool is None:
            self._pool = self._new_pool()
            self._pool.start()

    def _new_pool(self) -> _WorkerPool:
        for fn in self._functions:  # before the fork, so every worker inherits what it loads
            warm_up = getattr(fn, WARM_UP_ATTR, None)
            if callable(warm_up):
                warm_up()
        specs = [component.spec for component in self.components]
        return _WorkerPool(specs, self.cfg.num_workers, self.cfg.sandbox_settings())

    def metrics(self) -> dict[str, float]:
        """Counters of the last `score` call, keyed for the run's metric log."""
        return dict(self._metrics)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> RewardComputer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing useful to do
            pass

    def _budget_from_now(self) -> float | None:
        budget = self.cfg.step_budget_s
        return None if budget is None else time.monotonic() + budget

    def _run_in_process(self, calls: list[_Call], budget_end: float | None) -> dict[int, _Outcome]:
        outcomes = {}
        for call in calls:
            if budget_end is not None and time.monotonic() >= budget_end:
                outcomes[call.call_id] = _Outcome("over_budget", message="not run: reward.step_budget_s spent")
                continue
            outcomes[call.call_id] = _run_reward(self._functions[call.component], call.completion, call.task, call.kwargs)
        return outcomes

    def _run_in_pool(self, calls: list[_Call], budget_end: float | None) -> tuple[dict[int, _Outcome], int]:
        self._pool = self._pool or self._new_pool()
        try:
            run = self._pool.run(calls, self.cfg.timeout_s, self.cfg.skip_after_timeouts, budget_end)
            return run.outcomes, run.restarts
        except Exception:  # noqa: BLE001 - the pool itself broke (fd exhaustion, ...): start over
            logger.exception("reward worker pool failed; scoring the batch with the fallback")
            self.close()
            return {call.call_id: _Outcome("error", message="reward pool failed") for call in calls}, 0

    def _combine(self, count: int, outcomes: dict[int, _Outcome]) -> list[RewardResult]:
        results = []
        for index in range(count):
            result = RewardResult(score=0.0)
            for position, component in enumerate(self.components):
                outcome = outcomes.get(index * len(self.components) + position, _Outcome("error"))
                if outcome.status == "ok":
                    score, extras = outcome.score, outcome.extras
                else:
                    score, extras = self.cfg.fallback, {}
                    result.failed += 1
                result.score += component.weight * score
                result.parts[component.log_name] = score
                for key, value in extras.items():
                    if key == ACC_KEY:
                        result.parts.setdefault(ACC_KEY, value)  # several give acc: the first wins
                    else:
                        result.parts[f"{component.log_name}/{key}"] = value
            results.append(result)
        # A failed grade is not a correct answer: keep `acc` on every row once any row has it, so
        # group statistics over acc (DAPO filtering) never see a missing value.
        if any(ACC_KEY in result.parts for result in results):
            for result in results:
                result.parts.setdefault(ACC_KEY, 0.0)
        return results

    def _record_metrics(self, outcomes: dict[int, _Outcome], restarts: int, seconds: float) -> None:
        statuses = Counter(outcome.status for outcome in outcomes.values())
        self._metrics = {
            "reward/failures": float(sum(n for status, n in statuses.items() if status != "ok")),
            "reward/timeouts": float(statuses["timeout"]),
            "reward/errors": float(statuses["error"]),
            "reward/invalid": float(statuses["invalid"]),
            "reward/skipped": float(statuses["skipped"]),
            "reward/over_budget": float(statuses["over_budget"]),
            "reward/worker_restarts": float(restarts),
            "reward/time_s": seconds,
        }
        self._warn_failures(outcomes)

    def _track_failures(self, outcomes: dict[int, _Outcome]) -> None:
        width = len(self.components)
        for call_id, outcome in sorted(outcomes.items()):
            streak = self._streaks[call_id % width]
            streak.calls += 1
            streak.ok = streak.ok or outcome.status == "ok"
            if outcome.status != "ok" and not streak.first_error:
                streak.first_error = f"{outcome.status}: {outcome.message}"
        limit = self.cfg.abort_after_failing_steps
        if not (self._in_training and limit):
            return
        for component, streak in zip(self.components, self._streaks):
            # The current step counts once it has a failed call and no success so far.
            if streak.calls and not streak.ok and streak.steps + 1 >= limit:
                raise RewardFailingError(
                    f"reward {component.log_name!r} ({component.spec}) failed on every call for {limit} "
                    f"training steps in a row; first error: {streak.first_error} (fix the function, or set "
                    f"reward.abort_after_failing_steps: 0 to train on the fallback score)"
                )

    def _warn_failures(self, outcomes: dict[int, _Outcome]) -> None:
        width = len(self.components)
        for position, component in enumerate(self.components):
            mine = [outcome for call_id, outcome in sorted(outcomes.items()) if call_id % width == position]
            failed = [outcome for outcome in mine if outcome.status != "ok"]
            if failed:
                kinds = Counter(outcome.status for outcome in failed)
                logger.warning(
                    "reward %r: %d of %d calls scored the fallback %g (%s); first: %s",
                    component.log_name,
                    len(failed),
                    len(mine),
                    self.cfg.fallback,
                    ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())),
                    failed[0].message,
                )

    def _check_log_names(self) -> None:
        names = Counter(component.log_name for component in self.components)
        duplicates = sorted(name for name, n in names.items() if n > 1)
        if duplicates:
            raise RewardConfigError(
                f"reward functions {duplicates} appear more than once; give each a distinct `name`"
            )
        if ACC_KEY in names:
            raise RewardConfigError(f"a reward component may not be named {ACC_KEY!r} (reserved)")
