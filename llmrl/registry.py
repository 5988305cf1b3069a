"""One registry helper for every pluggable part (engines, backends, workflows, advantages, losses,
KL estimators, rewards, ...): register with a duplicate check, look up with a did-you-mean error,
list the names. Adding a part is one decorated function or class; the recipe schema validates
names against the registry, so nothing else needs editing.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no entry is registered under. A KeyError for mapping code, a ValueError for pydantic
    validators and callers that report bad recipe values; its message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}' (known: {', '.join(sorted(known))}){hint}"


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _same_definition(a: Any, b: Any) -> bool:
    """The same object, or the same function/class defined again (its module imported twice).
    Two instances are the same only when equal: a preset must not replace another silently."""
    if a is b:
        return True
    if hasattr(a, "__qualname__") and hasattr(b, "__qualname__"):
        return _qualified_name(a) == _qualified_name(b)
    return type(a) is type(b) and a == b


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry. `loader` imports the modules whose decorators fill it, on first lookup, so
    optional parts (vLLM, DeepSpeed) register without importing their heavy dependencies."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._requirements: dict[str, Callable[[], str | None]] = {}
        self._loader = loader
        self._loaded = loader is None

    # ------------------------------------------------------------------ registering
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T, *, requirement: Callable[[], str | None] | None = None) -> T: ...

    def register(self, name: str, entry: Any = None, *, requirement: Callable[[], str | None] | None = None) -> Any:
        """`@registry.register("name")` or `registry.register("name", entry)`. `requirement`
        returns why the entry cannot run in this install (None when it can)."""

        def add(obj: T) -> T:
            existing = self._entries.get(name)
            # The same object, or a module imported twice, re-registers harmlessly; a clash does not.
            if existing is not None and not _same_definition(existing, obj):
                raise ValueError(
                    f"{self.kind} '{name}' is already registered by {_qualified_name(existing)}; "
                    f"cannot register {_qualified_name(obj)} under it"
                )
            self._entries[name] = obj
            if requirement is not None:
                self._requirements[name] = requirement
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove `name` if present (tests that register a temporary entry clean up with it)."""
        self._entries.pop(name, None)
        self._requirements.pop(name, None)

    # ------------------------------------------------------------------ looking up
    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the loader's imports register through this registry
            assert self._loader is not None
            try:
                self._loader()
            except BaseException:
                self._loaded = False  # a failed import is reported again on the next lookup
                raise

    def __getitem__(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, list(self._entries))) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def unavailable(self, name: str) -> str | None:
        """Why `name` cannot be used here, in one line (unknown, or its requirement fails); None when it can."""
        if name not in self:
            return unknown_name_message(self.kind, name, self.names())
        requirement = self._requirements.get(name)
        return requirement() if requirement else None

    def check(self, name: str) -> str:
        """`name` if registered, else a ValueError naming the known names (for schema validators)."""
        self[name]
        return name

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def registered_name(registry: Registry[Any]) -> Any:
    """A recipe field type: a str that must be one of `registry`'s names (checked at validation)."""
    from typing import Annotated

    from pydantic import AfterValidator

    return Annotated[str, AfterValidator(registry.check)]
