"""Reward API: how reward functions are named, configured, called and kept from hurting the run.

A reward is a plain function `fn(completion: str, task: Task, **kw) -> float | dict`. It is named
in a recipe as a registered name (`gsm8k`), a file (`path/to/file.py:fn`), a module function
(`package.module:fn`) or an entry point in the group `llmrl.rewards`. `RewardComputer` runs the
configured functions over a batch of trajectories in worker processes with a per-call timeout,
combines them by weight, and turns every failure of user code (exception, hang, crash, NaN, wrong
type) into the configured fallback score plus a counter, so a bad reward never ends a run.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from numbers import Real
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from pydantic import Field, field_validator

from llmrl.config_base import Section
from llmrl.types import Task, Trajectory

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Any]  # fn(completion, task, **kw) -> float | dict[str, float]
ENTRY_POINT_GROUP = "llmrl.rewards"
# Keyword arguments the computer can supply. A function gets one only when its signature names it
# (or takes **kwargs), so the common `fn(completion, task)` stays valid.
OPTIONAL_KWARGS = ("trajectory", "finish_reason", "response")
ACC_KEY = "acc"  # accuracy part; DAPO's dynamic-sampling filter key (specs §2.4 item 3)


class RewardConfigError(ValueError):
    """A reward spec or reward setting that cannot be used; the message names the bad value."""


# ---------------------------------------------------------------- registry and resolution

_REGISTRY: dict[str, RewardFn] = {}
_FILE_MODULES: dict[Path, ModuleType] = {}
_builtins_loaded = False


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to recipes under `name`."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REGISTRY.get(name)
        # Re-registering the same function (a module loaded twice) is harmless; a clash is not.
        if existing is not None and _qualified_name(existing) != _qualified_name(fn):
            raise RewardConfigError(
                f"reward name {name!r} is already registered by {_qualified_name(existing)}; "
                f"cannot register {_qualified_name(fn)} under it"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> dict[str, RewardFn]:
    """All registered rewards (built-ins included), by name."""
    _load_builtins()
    return dict(_REGISTRY)


def resolve_reward(spec: str) -> RewardFn:
    """Turn a recipe's reward spec into the function it names.

    `name` (registered, then entry point group `llmrl.rewards`), `path/to/file.py:fn` (relative
    to the working directory, or absolute) or `package.module:fn`.
    """
    spec = spec.strip()
    if not spec:
        raise RewardConfigError("empty reward spec: name a reward, `file.py:fn` or `module:fn`")
    if ":" in spec:
        return _resolve_qualified(spec)
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    entry_point = _entry_points().get(spec)
    if entry_point is not None:
        try:
            fn = entry_point.load()
        except Exception as exc:
            raise RewardConfigError(
                f"reward {spec!r} comes from entry point {entry_point.value!r} "
                f"(group {ENTRY_POINT_GROUP}), which failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        return _require_callable(fn, spec)
    raise _unknown_reward_error(spec)


def known_reward_names() -> list[str]:
    """Registered names plus entry point names, sorted: what a bare-name spec may be."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def default_reward_for_kind(kind: str) -> str:
    """The reward a task type uses when the recipe lists none."""
    defaults = {"arithmetic": "arithmetic", "gsm8k": "gsm8k", "math": "math"}
    if kind not in defaults:
        raise RewardConfigError(
            f"data type {kind!r} has no default reward; list one in reward.functions "
            f"(data types with a default: {', '.join(sorted(defaults))})"
        )
    return defaults[kind]


# Modules of the top-level `rewards` package that register built-ins. Imported one by one rather
# than through `rewards/__init__.py`, which an editable install made before that file existed
# treats as a namespace package and never runs.
BUILTIN_REWARD_MODULES = (
    "rewards.arithmetic",
    "rewards.format",
    "rewards.gsm8k",
    "rewards.length",
    "rewards.math",
    "rewards.toy",
)


def _load_builtins() -> None:
    # Imported lazily: the built-ins import this module to register themselves.
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_REWARD_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point)  # the first distribution on sys.path wins
    return found


def _unknown_reward_error(spec: str) -> RewardConfigError:
    known = known_reward_names()
    close = difflib.get_close_matches(spec, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    return RewardConfigError(
        f"unknown reward {spec!r}.{hint} Known rewards: {', '.join(known)}. A reward can also be "
        f"a file (`path/to/file.py:fn`), a module function (`package.module:fn`) or an entry "
        f"point in group {ENTRY_POINT_GROUP!r}."
    )


def _resolve_qualified(spec: str) -> RewardFn:
    target, _, attribute = spec.rpartition(":")  # rpartition: a Windows drive letter has a colon
    if not target or not attribute:
        raise RewardConfigError(f"reward spec {spec!r} must look like `file.py:fn` or `module:fn`")
    module = _load_file(target, spec) if _looks_like_path(target) else _import_module(target, spec)
    if not hasattr(module, attribute):
        public = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
        close = difflib.get_close_matches(attribute, public, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
        raise RewardConfigError(f"reward spec {spec!r}: {target} has no attribute {attribute!r}.{hint}")
    return _require_callable(getattr(module, attribute), spec)


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _absolute_path(target: str) -> Path:
    path = Path(target).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def _load_file(target: str, spec: str) -> ModuleType:
    path = _absolute_path(target)
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise RewardConfigError(
            f"reward file not found: {path} (from spec {spec!r}; relative paths are taken from "
            f"the working directory {Path.cwd()})"
        )
    # A unique module name per path: two plugins both called `reward.py` must not collide, and
    # registering it in sys.modules lets classes defined in the plugin pickle.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"llmrl_reward_plugin_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardConfigError(f"reward file {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardConfigError(
            f"reward file {path} (from spec {spec!r}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    _FILE_MODULES[path] = module
    return module


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise RewardConfigError(
                f"reward spec {spec!r}: no module named {target!r} (is it installed or on "
                f"PYTHONPATH? a file needs a path ending in .py)"
            ) from exc
        raise RewardConfigError(f"reward module {target!r} failed to import: {exc}") from exc
    except Exception as exc:
        raise RewardConfigError(
            f"reward module {target!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc


def _require_callable(value: Any, spec: str) -> RewardFn:
    if not callable(value):
        raise RewardConfigError(f"reward spec {spec!r} names a {type(value).__name__}, not a function")
    return value


def _qualified_name(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _canonical_spec(spec: str) -> str:
    """The spec a worker process can resolve on its own: file paths made absolute."""
    spec = spec.strip()
    target, colon, attribute = spec.rpartition(":")
    if colon and target and _looks_like_path(target):
        return f"{_absolute_path(target)}:{attribute}"
    return spec


# ---------------------------------------------------------------- config


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


# ---------------------------------------------------------------- calling one function


@dataclass
class RewardResult:
    score: float  # weighted sum of the components' scores
    parts: dict[str, float] = field(default_factory=dict)  # per component, plus `acc` if given
    failed: int = 0  # components that scored the fallback


class _Outcome(NamedTuple):
    status: str  # "ok", "error", "invalid", "timeout", "skipped"
    score: float = 0.0
    extras: dict[str, float] = {}  # a dict return's parts other than `score`
    message: str = ""


@dataclass(frozen=True)
class _Component:
    spec: str  # canonical: resolvable inside a worker process
    log_name: str
    weight: float
    kwargs: dict[str, Any]
    wanted: frozenset[str]  # which OPTIONAL_KWARGS the signature asks for


def _run_reward(fn: RewardFn, completion: str, task: Task, kwargs: dict[str, Any]) -> _Outcome:
    try:
        value = fn(completion, task, **kwargs)
    except KeyboardInterrupt:
        raise  # in-process only (workers ignore SIGINT): Ctrl-C must still stop the run
    except BaseException as exc:  # noqa: BLE001 - SystemExit or math-verify's TimeoutException too
        return _Outcome("error", message=f"{type(exc).__name__}: {exc}"[:500])
    return _check_value(value)


def _check_value(value: Any) -> _Outcome:
    """Accept a finite real, or a mapping with a finite real `score` and finite real parts."""
    if isinstance(value, Mapping):
        if "score" not in value:
            return _Outcome("invalid", message=f"returned a dict without 'score' (keys {sorted(map(str, value))})")
        parts: dict[str, float] = {}
        for key, part in value.items():
            number = _finite_number(part)
            if not isinstance(key, str) or number is None:
                return _Outcome("invalid", message=f"returned {key!r}={part!r}: not a finite number")
            parts[key] = number
        score = parts.pop("score")
        return _Outcome("ok", score, parts)
    number = _finite_number(value)
    if number is None:
        return _Outcome("invalid", message=f"returned {type(value).__name__} {value!r:.80}, not a finite number")
    return _Outcome("ok", number)


def _finite_number(value: Any) -> float | None:
    # numbers.Real covers int, float, bool and numpy scalars; tensors are rejected on purpose, so
    # a reward cannot leak autograd state into worker results.
    if not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


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


# ---------------------------------------------------------------- worker processes


class _Call(NamedTuple):
    call_id: int
    component: int
    completion: str
    task: Task
    kwargs: dict[str, Any]


_STARTUP_TIMEOUT_S = 60.0  # resolving specs in a fresh worker may import heavy modules (sympy)
_MAX_CHUNK = 64


def _worker_main(conn: Connection, specs: list[str]) -> None:
    """Worker loop: resolve every spec once, then run chunks of calls, one reply per call.

    One reply per call (not per chunk) lets the parent time each call separately: a call starts
    when the previous reply arrives.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # own process group: a kill also reaches subprocesses a reward started
    functions: dict[int, RewardFn] = {}
    load_errors: dict[int, str] = {}
    for index, spec in enumerate(specs):
        try:
            functions[index] = resolve_reward(spec)
        except Exception as exc:  # noqa: BLE001 - reported per call instead
            load_errors[index] = f"could not resolve {spec!r} in worker: {exc}"
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if chunk is None:
            return
        for call in chunk:
            fn = functions.get(call.component)
            if fn is None:
                outcome = _Outcome("error", message=load_errors[call.component])
            else:
                outcome = _run_reward(fn, call.completion, call.task, call.kwargs)
            try:
                conn.send((call.call_id, outcome))
            except OSError:
                return  # the parent went away mid-chunk


class _WorkerStartError(RuntimeError):
    pass


@dataclass
class _Worker:
    process: Any  # multiprocessing process
    conn: Connection
    inflight: deque[_Call] = field(default_factory=deque)  # sent, unanswered, in run order
    last_progress: float = 0.0  # when the call at the head of `inflight` started


@dataclass
class _PoolRun:
    outcomes: dict[int, _Outcome] = field(default_factory=dict)
    restarts: int = 0


class _WorkerPool:
    """Worker processes with a per-call timeout; a hung or dead worker is killed and replaced."""

    def __init__(self, specs: list[str], size: int) -> None:
        self._specs = specs
        self._size = size
        # fork: workers start in milliseconds and inherit what the parent already imported and
        # registered; elsewhere spawn, where specs are resolved again by import.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self._context = multiprocessing.get_context(method)
        self._workers: list[_Worker] = []

    def run(self, calls: list[_Call], timeout_s: float, skip_after_timeouts: int) -> _PoolRun:
        result = _PoolRun()
        pending: deque[_Call] = deque(calls)
        timeouts_by_component: Counter[int] = Counter()
        self._prune_dead()
        self._fill()
        while pending or any(worker.inflight for worker in self._workers):
            if not self._workers:
                for call in pending:
                    result.outcomes[call.call_id] = _Outcome("error", message="no reward worker could start")
                break
            self._dispatch(pending)
            busy = [worker for worker in self._workers if worker.inflight]
            if not busy:
                continue
            deadline = min(worker.last_progress for worker in busy) + timeout_s
            ready = wait([worker.conn for worker in busy], timeout=max(0.0, deadline - time.monotonic()))
            for worker in busy:
                if worker.conn in ready:
                    self._receive(worker, pending, result)
            now = time.monotonic()
            for worker in busy:
                if worker in self._workers and worker.inflight and now - worker.last_progress > timeout_s:
                    hung = worker.inflight.popleft()
                    result.outcomes[hung.call_id] = _Outcome(
                        "timeout", message=f"took longer than {timeout_s:g} s; worker killed"
                    )
                    timeouts_by_component[hung.component] += 1
                    self._retire(worker, pending, result)
            if skip_after_timeouts:
                self._skip_hopeless(pending, timeouts_by_component, skip_after_timeouts, result)
        return result

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            self._kill(worker)
        self._workers = []

    def _prune_dead(self) -> None:
        # A worker that died between batches would have its death blamed on a new call, and one
        # still busy with a batch that was interrupted (Ctrl-C) would answer with stale call ids.
        stale = [worker for worker in self._workers if worker.inflight or not worker.process.is_alive()]
        for worker in stale:
            self._kill(worker)
            self._workers.remove(worker)

    def _fill(self) -> None:
        while len(self._workers) < self._size:
            try:
                self._workers.append(self._start())
            except _WorkerStartError as exc:
                logger.error("reward worker failed to start: %s", exc)
                return

    def _start(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        # daemon: workers never outlive the trainer (a reward can still use `subprocess`).
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._specs), daemon=True, name="llmrl-reward-worker"
        )
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn)
        try:
            if parent_conn.poll(_STARTUP_TIMEOUT_S) and parent_conn.recv() == "ready":
                return worker
        except (EOFError, OSError):
            pass
        self._kill(worker)
        raise _WorkerStartError(f"no ready signal within {_STARTUP_TIMEOUT_S:g} s (exit code {process.exitcode})")

    def _dispatch(self, pending: deque[_Call]) -> None:
        # Chunks amortise the pipe round-trip over many fast calls; two chunks per worker keep
        # the load balanced when calls are slow.
        chunk_size = max(1, min(_MAX_CHUNK, -(-len(pending) // (2 * len(self._workers)))))
        for worker in self._workers:
            if worker.inflight or not pending:
                continue
            chunk = [pending.popleft() for _ in range(min(chunk_size, len(pending)))]
            worker.inflight.extend(chunk)
            worker.last_progress = time.monotonic()
            try:
                worker.conn.send(chunk)
            except OSError:
                pass  # a dead worker shows up as EOF on the next wait, which requeues the chunk

    def _receive(self, worker: _Worker, pending: deque[_Call], result: _PoolRun) -> None:
        try:
            while worker.inflight and worker.conn.poll():
                call_id, outcome = worker.conn.recv()
                worker.inflight.popleft()
                result.outcomes[call_id] = outcome
                worker.last_progress = time.monotonic()
        except (EOFError, OSError):
            # The worker died mid-call (os._exit, segfault, out of memory): the head call did it.
            worker.process.join(timeout=1.0)
            crashed = worker.inflight.popleft()
            result.outcomes[crashed.call_id] = _Outcome(
                "error", message=f"worker process died (exit code {worker.process.exitcode})"
            )
            self._retire(worker, pending, result)

    def _retire(self, worker: _Worker, pending: deque[_Call], result: _PoolRun) -> None:
        """Kill a worker, give its unstarted calls back to the queue, and start a replacement."""
        pending.extendleft(reversed(worker.inflight))
        worker.inflight.clear()
        self._kill(worker)
        self._workers.remove(worker)
        result.restarts += 1
        self._fill()

    def _kill(self, worker: _Worker) -> None:
        process = worker.process
        if process.is_alive():
            try:
                if hasattr(os, "killpg"):
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            except (ProcessLookupError, PermissionError):  # no group yet: kill the process alone
                process.kill()
            process.join(timeout=5.0)
        worker.conn.close()

    @staticmethod
    def _skip_hopeless(
        pending: deque[_Call], timeouts: Counter[int], limit: int, result: _PoolRun
    ) -> None:
        hopeless = {component for component, count in timeouts.items() if count >= limit}
        if not hopeless:
            return
        keep = [call for call in pending if call.component not in hopeless]
        for call in pending:
            if call.component in hopeless:
                result.outcomes[call.call_id] = _Outcome(
                    "skipped", message=f"not run: timed out {limit} times in this batch"
                )
        pending.clear()
        pending.extend(keep)


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
        if self.cfg.num_workers == 0:
            outcomes = {
                call.call_id: _run_reward(self._functions[call.component], call.completion, call.task, call.kwargs)
                for call in calls
            }
        else:
            outcomes, restarts = self._run_in_pool(calls)
        results = self._combine(len(trajectories), outcomes)
        self._record_metrics(outcomes, restarts, time.perf_counter() - start)
        return results

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

    def _run_in_pool(self, calls: list[_Call]) -> tuple[dict[int, _Outcome], int]:
        if self._pool is None:
            self._pool = _WorkerPool([component.spec for component in self.components], self.cfg.num_workers)
        try:
            run = self._pool.run(calls, self.cfg.timeout_s, self.cfg.skip_after_timeouts)
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
            "reward/worker_restarts": float(restarts),
            "reward/time_s": seconds,
        }
        self._warn_failures(outcomes)

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
