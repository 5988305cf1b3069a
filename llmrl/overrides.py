"""Reading recipe YAML strictly, and applying `key=value` overrides while remembering which
override set which key, so an error names the override the user typed rather than the file.

Two rules, both documented in README.md (under "Commands"):
- a key written twice in one mapping is an error (YAML itself would silently keep the last);
- `section={...}` merges into the section: keys it names are replaced, the others kept.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # resolve `<<:` merge keys first, as SafeLoader does
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"duplicate key {key!r} on line {line} (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def strict_load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


class OverrideError(ValueError):
    """An override that cannot be parsed; recipe.py reports it as a RecipeError."""


KeyPath = tuple[str, ...]  # a dotted key, split: ("train", "steps")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in item:
        raise OverrideError(f"override '{item}' is not of the form key=value (e.g. train.steps=2)")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(part.strip() for part in path):
        raise OverrideError(f"override '{item}': the key {key.strip()!r} has an empty part")
    try:
        value = strict_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise OverrideError(f"override '{item}': cannot parse the value {raw!r}: {reason}") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 (no dot) as a string; users mean the number
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return [part.strip() for part in path], value


class Overrides:
    """Overrides applied to a recipe mapping, and for each key they set, the override's text."""

    def __init__(self, items: Iterable[str]) -> None:
        self.items = list(items)
        self.origin: dict[KeyPath, str] = {}  # leaf key path -> the override that set it last

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        for item in self.items:
            path, value = parse_override(item)
            node = data
            for part in path[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
            last = path[-1]
            if isinstance(value, dict) and isinstance(node.get(last), dict):
                _merge(node[last], value)  # `section={...}` updates the section, never empties it
            else:
                node[last] = value
            for leaf in _leaves(tuple(path), value):
                self.origin.pop(leaf, None)  # re-inserted: the dict's order is the order of setting
                self.origin[leaf] = item
        return data

    def source_of(self, loc: Iterable[Any], *, inside: bool = False) -> str | None:
        """The latest override that set key `loc` or a section above it; with `inside`, also one
        that set a key below `loc` (an unknown section `rolout` is an error at `rolout`, set by
        `rolout.n=2`)."""
        key = tuple(str(p) for p in loc)
        found = None
        for path, item in self.origin.items():
            if key[: len(path)] == path or (inside and path[: len(key)] == key):
                found = item  # the dict's order is the order of setting: the last match wins
        return found

    def keys_in(self, message: str) -> list[str]:
        """Overrides whose key a message names (for errors that span several keys)."""
        named = []
        for path, item in self.origin.items():
            if ".".join(path) in message and item not in named:
                named.append(item)
        return named


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return Overrides(overrides).apply(data)


def _merge(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _leaves(path: KeyPath, value: Any) -> list[KeyPath]:
    if isinstance(value, dict) and value:
        return [leaf for key, child in value.items() for leaf in _leaves((*path, str(key)), child)]
    return [path]
