"""Rows from a file, a directory or the hub, always through `datasets`."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import load_dataset

from llmrl.data.config import DataConfigError

Row = dict[str, Any]

# File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# `owner/name`, no file suffix: what a hub dataset id looks like (a typo'd local path does not).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and Path(path).suffix not in FILE_BUILDERS


def load_rows(
    path: str,
    split: str,
    *,
    subdirs: Sequence[str] = (),
    subset: str | None = None,
    key: str = "data.path",
    limit: int | None = None,
) -> tuple[list[Row], str]:
    """Rows of `split` from `path` and a label saying where they came from.

    A file is read whole (its name, not `split`, decides what it holds). A directory is searched
    for `<split>.jsonl|.json|.parquet`, first under each of `subdirs` (a data root laid out as
    `gsm8k/train.jsonl`), then at its top; failing that `datasets` infers its layout.
    """
    local = Path(path).expanduser()
    if local.is_file():
        return _read_file(local, key, limit), str(local)
    if local.is_dir():
        found = _split_file(local, split, subdirs)
        if found is not None:
            return _read_file(found, key, limit), str(found)
        return _read_with_datasets(str(local), None, split, key, limit, f"directory {local}")
    if looks_like_hub_id(path):
        return _read_with_datasets(path, subset, split, key, limit, f"hub dataset {path!r}")
    raise DataConfigError(f"{key}: {path!r} is not an existing file or directory, nor a hub id")


def _split_file(root: Path, split: str, subdirs: Sequence[str]) -> Path | None:
    for base in [root / sub for sub in subdirs] + [root]:
        for suffix in FILE_BUILDERS:
            candidate = base / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_file(file: Path, key: str, limit: int | None) -> list[Row]:
    builder = FILE_BUILDERS.get(file.suffix)
    if builder is None:
        known = ", ".join(FILE_BUILDERS)
        raise DataConfigError(f"{key}: {file} has an unsupported suffix; use one of {known}")
    try:
        dataset = load_dataset(builder, data_files=str(file), split="train")
    except Exception as err:  # a parse error deep in pyarrow: report it in one line
        raise DataConfigError(f"{key}: cannot read {file}: {_one_line(err)}") from err
    return _to_rows(dataset, limit)


def _read_with_datasets(
    name: str, subset: str | None, split: str, key: str, limit: int | None, label: str
) -> tuple[list[Row], str]:
    try:
        dataset = load_dataset(name, subset, split=split)
    except Exception as err:  # offline, unknown id, missing split: all end the same way
        raise DataConfigError(
            f"{key}: cannot load split {split!r} of {label}: {_one_line(err)}"
        ) from err
    return _to_rows(dataset, limit), f"{label} [{split}]"


def _to_rows(dataset: Any, limit: int | None) -> list[Row]:
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset.to_list()


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
