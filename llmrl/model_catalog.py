"""`llmrl models`: the built-in models, their size and source, and whether they are cached;
`--prepare NAME` materialises one ahead of time (an offline cluster node, a CI image)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from llmrl.models import BUILTIN_MODELS, BUILTIN_PARAMS, BUILTIN_SOURCES, ModelError, builtin_cache_path, resolve_model_path
from llmrl.stored_weights import stored_tensor_specs


@dataclass
class ModelEntry:
    name: str
    source: str
    path: Path
    cached: bool
    params: int  # counted from the cached weights; the registered count until then


def count_params(directory: Path) -> int:
    """Parameters stored in a directory's safetensors files, from their headers alone (tied
    embeddings are stored, and counted, once)."""
    return sum(math.prod(shape) for shape, _ in stored_tensor_specs(directory).values())


def catalog() -> list[ModelEntry]:
    out = []
    for name in sorted(BUILTIN_MODELS):
        path = builtin_cache_path(name)
        cached = (path / "config.json").exists()
        out.append(ModelEntry(name, BUILTIN_SOURCES.get(name, ""), path, cached, count_params(path) if cached else BUILTIN_PARAMS.get(name, 0)))
    return out


def prepare(name: str) -> ModelEntry:
    if name not in BUILTIN_MODELS:
        raise ModelError(f"llmrl models --prepare: '{name}' is not a built-in model ({', '.join(sorted(BUILTIN_MODELS))})")
    resolve_model_path(name)
    return next(e for e in catalog() if e.name == name)


def format_catalog(entries: list[ModelEntry]) -> list[str]:
    rows = [("name", "params", "cached", "source")]
    for e in entries:
        rows.append((e.name, f"{e.params / 1e6:.1f}M", str(e.path) if e.cached else "no", e.source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]


def as_json(entries: list[ModelEntry]) -> str:
    return json.dumps([{**e.__dict__, "path": str(e.path)} for e in entries], indent=1)
