"""Reward registry and resolution: how a recipe's reward spec becomes a function.

A spec is a registered name (`gsm8k`), a file (`path/to/file.py:fn`), a module function
(`package.module:fn`) or an entry point in the group `llmrl.rewards`. Names live in `REWARDS`, a
`llmrl.registry.Registry` whose loader imports the built-in rewards (`llmrl.reward.builtin`) on
first lookup.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from llmrl.registry import Registry

RewardFn = Callable[..., Any]  # fn(completion, task, **kw) -> float | dict[str, float]
ENTRY_POINT_GROUP = "llmrl.rewards"


class RewardConfigError(ValueError):
    """A reward spec or reward setting that cannot be used; the message names the bad value."""


# ---------------------------------------------------------------- registry and resolution

_FILE_MODULES: dict[Path, ModuleType] = {}
# What a plugin's import may raise that must become a configuration error: a `sys.exit()` at
# module level (SystemExit) included, so it cannot end the trainer with the plugin's exit code.
# KeyboardInterrupt still stops the run.
_IMPORT_FAILURES = (Exception, SystemExit, GeneratorExit)

# Modules that register the built-in rewards, imported on first lookup by `REWARDS`' loader
# (lazily: the built-ins import this package to register themselves).
BUILTIN_REWARD_MODULES = (
    "llmrl.reward.builtin.arithmetic",
    "llmrl.reward.builtin.format",
    "llmrl.reward.builtin.gsm8k",
    "llmrl.reward.builtin.length",
    "llmrl.reward.builtin.math",
    "llmrl.reward.builtin.search_qa",
    "llmrl.reward.builtin.toy",
)


def _load_builtins() -> None:
    for module in BUILTIN_REWARD_MODULES:
        importlib.import_module(module)


REWARDS: Registry[RewardFn] = Registry("reward", loader=_load_builtins)


# Attribute a reward function carries when it grades against `task.answer`: data rows without a
# gold answer are then malformed (skipped, fatal in bulk) rather than scored by the fallback.
NEEDS_ANSWER_ATTR = "needs_answer"

# Attribute a reward function may carry: a callable the reward computer runs once in the trainer
# before it forks its workers, for what every call needs and is slow to load (an import). The
# workers then inherit it; loaded in a worker, it would count against the first call's
# timeout_s and cpu_limit_s, and again in every restarted worker.
WARM_UP_ATTR = "warm_up"


def register_reward(
    name: str, *, needs_answer: bool = False, warm_up: Callable[[], object] | None = None
) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to recipes under `name`. `needs_answer`: it grades against
    the task's gold answer (a plugin can set `fn.needs_answer = True` itself). `warm_up`: run once
    before reward workers fork (WARM_UP_ATTR; a plugin can set `fn.warm_up` itself)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if needs_answer:
            setattr(fn, NEEDS_ANSWER_ATTR, True)
        if warm_up is not None:
            setattr(fn, WARM_UP_ATTR, warm_up)
        # Re-registering the same function (a module loaded twice) is harmless; a clash is not.
        try:
            return REWARDS.register(name, fn)
        except ValueError:
            existing = REWARDS[name]
            raise RewardConfigError(
                f"reward name {name!r} is already registered by {_qualified_name(existing)}; "
                f"cannot register {_qualified_name(fn)} under it"
            ) from None

    return decorator


def registered_rewards() -> dict[str, RewardFn]:
    """All registered rewards (built-ins included), by name."""
    return dict(REWARDS)


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
    if spec in REWARDS:
        return REWARDS[spec]
    entry_point = _entry_points().get(spec)
    if entry_point is not None:
        try:
            fn = entry_point.load()
        except _IMPORT_FAILURES as exc:
            raise RewardConfigError(
                f"reward {spec!r} comes from entry point {entry_point.value!r} "
                f"(group {ENTRY_POINT_GROUP}), which failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        return _require_callable(fn, spec)
    raise _unknown_reward_error(spec)


def reward_needing_answer(specs: list[str]) -> str | None:
    """The first of `specs` whose function grades against the gold answer, or None. A spec that
    does not resolve counts as not needing one (the recipe check reports it)."""
    for spec in specs:
        try:
            fn = resolve_reward(spec)
        except RewardConfigError:
            continue
        if getattr(fn, NEEDS_ANSWER_ATTR, False):
            return spec
    return None


def known_reward_names() -> list[str]:
    """Registered names plus entry point names, sorted: what a bare-name spec may be."""
    return sorted(set(REWARDS) | set(_entry_points()))


def default_reward_for_kind(kind: str) -> str:
    """The reward a task type uses when the recipe lists none."""
    defaults = {"arithmetic": "arithmetic", "gsm8k": "gsm8k", "math": "math", "qa": "search_f1", "multihop": "search_f1"}
    if kind not in defaults:
        raise RewardConfigError(
            f"data type {kind!r} has no default reward; list one in reward.functions "
            f"(data types with a default: {', '.join(sorted(defaults))})"
        )
    return defaults[kind]


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
    except _IMPORT_FAILURES as exc:
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
    except _IMPORT_FAILURES as exc:
        raise RewardConfigError(
            f"reward module {target!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc


def _require_callable(value: Any, spec: str) -> RewardFn:
    if not callable(value):
        raise RewardConfigError(f"reward spec {spec!r} names a {type(value).__name__}, not a function")
    return value


def _qualified_name(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def needs_import(spec: str) -> bool:
    """Whether resolving `spec` runs plugin code (a file, a module, or an entry point) rather than
    looking up a registered built-in."""
    spec = spec.strip()
    return ":" in spec or spec not in REWARDS


def _canonical_spec(spec: str) -> str:
    """The spec a worker process can resolve on its own: file paths made absolute."""
    spec = spec.strip()
    target, colon, attribute = spec.rpartition(":")
    if colon and target and _looks_like_path(target):
        return f"{_absolute_path(target)}:{attribute}"
    return spec
