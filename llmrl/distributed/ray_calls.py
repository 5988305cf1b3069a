"""Remote calls that never hang silently: every wait on a Ray actor goes through `call`, which
bounds it and turns a failure into a `ClusterError` naming the role, the host, the method and the
cause Ray reports (an actor killed for memory, a dead node...)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ClusterError(RuntimeError):
    """A remote part of the run failed or stopped answering; the message says which and why.
    `kind` is "died", "timeout" or "failed"; `handle` the actor, when one is to blame."""

    def __init__(self, message: str, kind: str = "failed", handle: "ActorHandle | None" = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.handle = handle


@dataclass
class ActorHandle:
    """A Ray actor with what an error message needs to name it."""

    actor: Any
    role: str  # "train rank 0", "rollout engine 1", ...
    host: str = "?"
    node_id: str = "?"


def call(handle: ActorHandle, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
    """`handle.actor.method(*args, **kwargs)`, waited on for at most `timeout` seconds."""
    return gather([(handle, method, args, kwargs)], timeout=timeout)[0]


def gather(calls: list[tuple[ActorHandle, str, tuple, dict]], timeout: float) -> list[Any]:
    """Start every call and wait for all of them within one `timeout`. The first call to fail
    raises at once (not after the calls before it, which may be blocked in a collective with the
    failed one), and a call still unanswered at the deadline raises; both name the actor."""
    import time

    import ray

    refs = [getattr(h.actor, m).remote(*a, **kw) for h, m, a, kw in calls]
    owner = {ref: (handle, method) for ref, (handle, method, _, _) in zip(refs, calls)}
    deadline = time.monotonic() + timeout
    results: dict[Any, Any] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            handle, method = owner[pending[0]]
            raise ClusterError(f"{handle.role} on {handle.host}: {method} did not answer within {timeout:g} s", "timeout", handle)
        error = _outcome(ready[0], owner, results)
        if error is not None:
            if error.kind == "failed":
                error = _death_behind(error, pending, owner, min(DEATH_GRACE_S, max(0.0, deadline - time.monotonic())))
            raise error
    return [results[ref] for ref in refs]


def answers(calls: list[tuple[ActorHandle, str, tuple, dict]], timeout: float) -> list[Any]:
    """Best effort, for reports: every call at once, waited on for one `timeout` in all; a call
    that failed or did not answer in time gives None instead of raising."""
    import ray

    refs = []
    for handle, method, args, kwargs in calls:
        try:
            refs.append(getattr(handle.actor, method).remote(*args, **kwargs))
        except ray.exceptions.RayError:
            refs.append(None)
    live = [ref for ref in refs if ref is not None]
    ready, _ = ray.wait(live, num_returns=len(live), timeout=timeout) if live else ([], [])
    done = set(ready)
    results: list[Any] = []
    for ref in refs:
        try:
            results.append(ray.get(ref) if ref is not None and ref in done else None)
        except ray.exceptions.RayError:
            results.append(None)
    return results


# A rank whose peer dies mid-collective fails at once ("connection closed by peer") while Ray may
# take a moment more to report the death itself; the death is the cause a user needs named.
DEATH_GRACE_S = 5.0


def _outcome(ref: Any, owner: dict, results: dict) -> "ClusterError | None":
    """Store a finished call's result, or return the ClusterError that names why it failed."""
    import ray

    handle, method = owner[ref]
    try:
        results[ref] = ray.get(ref)
        return None
    except ray.exceptions.RayActorError as err:
        return ClusterError(f"{handle.role} on {handle.host} died during {method}: {_root_cause(err)}", "died", handle)
    except ray.exceptions.RayTaskError as err:
        return ClusterError(f"{handle.role} on {handle.host} failed in {method}: {_root_cause(err)}", "failed", handle)
    except ray.exceptions.RayError as err:  # killed for memory, node lost, object lost...
        return ClusterError(f"{handle.role} on {handle.host}: {method} failed: {type(err).__name__}: {_root_cause(err)}", "died", handle)


def _death_behind(failure: ClusterError, pending: list, owner: dict, grace: float) -> ClusterError:
    """The error to report for `failure`: a death among the still-pending calls within `grace`
    seconds if there is one (a failure is often a peer's death seen through a collective),
    otherwise `failure` itself."""
    import time

    import ray

    until = time.monotonic() + grace
    pending = list(pending)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, until - time.monotonic()))
        if not ready:
            break
        error = _outcome(ready[0], owner, {})
        if error is not None and error.kind == "died":
            return error
    return failure


def _root_cause(err: Exception) -> str:
    """The last line Ray gives that says why (its messages run to many lines of context)."""
    cause = getattr(err, "cause", None)
    if cause is not None and not isinstance(cause, type(err)):
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if any(w in line.lower() for w in ("memory", "killed", "node", "error:", "exception"))]
    return (telling or lines or [type(err).__name__])[-1]
