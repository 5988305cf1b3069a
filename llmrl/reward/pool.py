"""Reward worker processes: run reward calls with a per-call timeout, and turn every failure of
user code (exception, hang, crash, NaN, wrong type) into an outcome instead of an error."""
from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from numbers import Real
from typing import Any, NamedTuple

from llmrl.reward import sandbox
from llmrl.reward.registry import RewardFn, resolve_reward
from llmrl.types import Task

logger = logging.getLogger("llmrl.reward")  # the name the reward module has always logged under


class _Outcome(NamedTuple):
    status: str  # "ok", "error", "invalid", "timeout", "skipped", "over_budget"
    score: float = 0.0
    extras: dict[str, float] = {}  # a dict return's parts other than `score`
    message: str = ""


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


# ---------------------------------------------------------------- worker processes


class _Call(NamedTuple):
    call_id: int
    component: int
    completion: str
    task: Task
    kwargs: dict[str, Any]


_STARTUP_TIMEOUT_S = 60.0  # resolving specs in a fresh worker may import heavy modules (sympy)
_MAX_CHUNK = 64


@dataclass(frozen=True)
class _Confinement:
    """What a worker needs from the pool: the lifeline pipe (read end, and the write end it must
    close) and, with the sandbox on, its limits and private directory."""

    lifeline: tuple[int, int]
    settings: sandbox.SandboxSettings | None = None
    private_dir: str | None = None
    user_reason: str = ""


def _worker_main(conn: Connection, specs: list[str], confinement: _Confinement | None = None) -> None:
    """Worker loop: confine the process, resolve every spec once (a plugin the trainer has not
    imported yet, as at `llmrl validate`, is imported here, inside the sandbox), then run chunks
    of calls, one reply per call.

    One reply per call (not per chunk) lets the parent time each call separately: a call starts
    when the previous reply arrives.
    """
    report: dict[str, str] = {}
    if confinement is not None:
        report = sandbox.enter(
            confinement.settings, confinement.private_dir, confinement.lifeline, conn.fileno(), confinement.user_reason
        )
    else:  # spawn (not Linux): no shim, just the basics
        sandbox.reset_signals()  # the trainer's SIGTERM handler is not the worker's
        if hasattr(os, "setpgrp"):
            os.setpgrp()  # own process group: a kill also reaches subprocesses a reward started
    settings = confinement.settings if confinement is not None else None
    cpu_limit_s = settings.cpu_limit_s if settings is not None else None
    functions: dict[int, RewardFn] = {}
    load_errors: dict[int, str] = {}
    for index, spec in enumerate(specs):
        try:
            functions[index] = resolve_reward(spec)
        except Exception as exc:  # noqa: BLE001 - reported at start-up and per call
            load_errors[index] = str(exc)
    conn.send(("ready", report, load_errors))
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
                spec, error = specs[call.component], load_errors[call.component]
                outcome = _Outcome("error", message=f"could not resolve {spec!r} in worker: {error}")
            else:
                sandbox.limit_call_cpu(cpu_limit_s)
                outcome = _run_reward(fn, call.completion, call.task, call.kwargs)
            try:
                conn.send((call.call_id, outcome))
            except OSError:
                return  # the parent went away mid-chunk


def _import_paths(specs: list[str]) -> list[str]:
    """Where a worker may import from: the interpreter's library, sys.path and plugin files."""
    paths = [sys.base_prefix, sys.prefix, *(entry for entry in sys.path if entry)]
    for spec in specs:
        target, colon, _ = spec.rpartition(":")
        if colon and (target.endswith(".py") or os.sep in target):
            paths.append(target)
    return paths


class _WorkerStartError(RuntimeError):
    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


def probe_import(spec: str, settings: sandbox.SandboxSettings | None) -> str | None:
    """Resolve one (canonical) spec in a throwaway worker, confined like the run's workers, and
    return why it failed, or None. A plugin that calls sys.exit or os._exit, crashes the
    interpreter or hangs while it is imported cannot take this process with it."""
    pool = _WorkerPool([spec], 1, settings, quiet=True)
    try:
        worker = pool._start()
        pool._workers.append(worker)  # so that close() stops it and removes its directory
    except _WorkerStartError as exc:
        if exc.exitcode is None:
            return f"importing it did not finish within {_STARTUP_TIMEOUT_S:g} s"
        if exc.exitcode < 0:
            return f"importing it killed its worker process with signal {signal.Signals(-exc.exitcode).name}"
        return f"importing it ended its worker process with exit code {exc.exitcode}"
    finally:
        pool.close()
    return worker.load_errors.get(0)


@dataclass
class _Worker:
    process: Any  # multiprocessing process
    conn: Connection
    inflight: deque[_Call] = field(default_factory=deque)  # sent, unanswered, in run order
    private_dir: str | None = None  # the sandbox's writable directory, removed with the worker
    load_errors: dict[int, str] = field(default_factory=dict)  # specs it could not resolve
    last_progress: float = 0.0  # when the call at the head of `inflight` started


@dataclass
class _PoolRun:
    outcomes: dict[int, _Outcome] = field(default_factory=dict)
    restarts: int = 0


class _WorkerPool:
    """Worker processes with a per-call timeout; a hung or dead worker is killed and replaced."""

    def __init__(
        self, specs: list[str], size: int, settings: sandbox.SandboxSettings | None = None, quiet: bool = False
    ) -> None:
        self._specs = specs
        self._quiet = quiet  # a probe reports its findings itself
        self._size = size
        # fork: workers start in milliseconds and inherit what the parent already imported and
        # registered; elsewhere spawn, where specs are resolved again by import.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self._context = multiprocessing.get_context(method)
        self._workers: list[_Worker] = []
        self._settings = settings
        unavailable = sandbox.available() if settings is not None else None
        if unavailable:
            logger.warning("reward.sandbox is on but %s; reward workers run unconfined", unavailable)
            self._settings = None
        self._user_reason = ""
        if self._settings is not None:
            for leftover in sandbox.remove_stale_private_dirs():
                logger.info("removed %s, left by a reward worker of a trainer that is gone", leftover)
            user, self._user_reason = sandbox.choose_user(self._settings.user, _import_paths(specs))
            self._settings = dataclasses.replace(self._settings, user=user)
        # Only this process holds the write end: the pipe reads EOF in every worker's shim the
        # moment the trainer is gone, however it died (sandbox or not).
        self._lifeline = os.pipe() if method == "fork" else None
        self.guarantees: dict[str, str] = {}  # the sandbox report of the first worker started

    def start(self) -> None:
        """Start the workers now rather than at the first call. Each is a fork of this process, and
        a fork shares every page of its parent until one side writes it: started after a model is
        loaded, a worker keeps the old copy of each page the trainer writes later (weights, packed
        copies, reused heap), and each such first write is a page fault that copies 4 KB. A worker
        replaced after a hang or crash is forked from the process as it is then."""
        self._fill()

    def run(
        self, calls: list[_Call], timeout_s: float, skip_after_timeouts: int, budget_end: float | None = None
    ) -> _PoolRun:
        """Run the calls; those not finished at the monotonic time `budget_end` score `over_budget`."""
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
            if budget_end is not None and time.monotonic() >= budget_end:
                self._abandon(pending, result)
                break
            self._dispatch(pending)
            busy = [worker for worker in self._workers if worker.inflight]
            if not busy:
                continue
            deadline = min(worker.last_progress for worker in busy) + timeout_s
            if budget_end is not None:
                deadline = min(deadline, budget_end)
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
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def _abandon(self, pending: deque[_Call], result: _PoolRun) -> None:
        """The step's reward budget is spent: what is unfinished scores `over_budget`; workers
        still busy are killed (the next batch starts fresh ones)."""
        message = "not finished within reward.step_budget_s; scored the fallback"
        for worker in [worker for worker in self._workers if worker.inflight]:
            for call in worker.inflight:
                result.outcomes[call.call_id] = _Outcome("over_budget", message=message)
            worker.inflight.clear()
            self._kill(worker)
            self._workers.remove(worker)
        for call in pending:
            result.outcomes[call.call_id] = _Outcome("over_budget", message=message)
        pending.clear()

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
        confinement = None
        if self._lifeline is not None:
            private_dir = sandbox.make_private_dir() if self._settings is not None else None
            confinement = _Confinement(self._lifeline, self._settings, private_dir, self._user_reason)
        # The lifeline ends workers with the trainer; daemon also has multiprocessing join them at a
        # normal exit (a reward can still use `subprocess`, not `multiprocessing`).
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._specs, confinement), daemon=True, name="llmrl-reward-worker"
        )
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn, private_dir=confinement.private_dir if confinement else None)
        try:
            if parent_conn.poll(_STARTUP_TIMEOUT_S):
                ready, report, worker.load_errors = parent_conn.recv()
                if ready == "ready":
                    self._note_guarantees(report)
                    if not self._workers and not self._quiet:  # once per pool, not per restart
                        for index, message in worker.load_errors.items():
                            logger.error("reward worker could not resolve %r: %s", self._specs[index], message)
                    return worker
        except (EOFError, OSError, ValueError, TypeError):
            pass
        process.join(timeout=1.0)
        exitcode = process.exitcode
        self._kill(worker)
        raise _WorkerStartError(f"no ready signal within {_STARTUP_TIMEOUT_S:g} s (exit code {exitcode})", exitcode)

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
            result.outcomes[crashed.call_id] = _Outcome("error", message=sandbox.describe_death(worker.process.exitcode))
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
        if worker.private_dir is not None:
            shutil.rmtree(worker.private_dir, ignore_errors=True)

    def _note_guarantees(self, report: dict[str, str]) -> None:
        if self.guarantees or not report:
            return
        self.guarantees = dict(report)
        missing = {name: state for name, state in report.items() if not state.startswith("on")}
        if missing and not self._quiet:
            logger.warning(
                "reward sandbox: %s; not in force: %s",
                ", ".join(name for name in report if name not in missing) or "nothing",
                "; ".join(f"{name} ({state})" for name, state in missing.items()),
            )

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
