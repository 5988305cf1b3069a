"""Rows from a file, a directory or the hub.

JSON Lines files are read here, line by line, so that a bad byte, a malformed line or a row that
is not an object is reported with its line number; .json and .parquet files, directories without
a split file, and hub ids go through `datasets`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmrl.data.config import DataConfigError
from llmrl.data.hub import hub_offline_reason, offline_datasets

Row = dict[str, Any]

# File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# `owner/name`, no file suffix: what a hub dataset id looks like (a typo'd local path does not).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, imported by its first call: importing `datasets` takes about 1.3 s
    (pyarrow, pandas), which every `llmrl` process paid, while JSON Lines files and the built-in
    data never need it."""
    from datasets import load_dataset as load

    return load(*args, **kwargs)


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
        return _read_hub(path, subset, split, key, limit, subdirs)
    raise DataConfigError(f"{key}: {path!r} is not an existing file or directory, nor a hub id")


def row_location(source: str, index: int) -> str:
    """Where row `index` (0-based) of `source` is, for error messages: `row #3`, plus the line
    for a JSON Lines file (blank lines are skipped when reading, so rows and lines can differ)."""
    file = Path(source)
    if file.suffix != ".jsonl" or not file.is_file():
        return f"row #{index}"
    with file.open("rb") as handle:
        rows = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                if rows == index:
                    return f"row #{index} ({file.name} line {number})"
                rows += 1
    return f"row #{index}"


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
    if file.stat().st_size == 0:
        raise DataConfigError(f"{key}: {file} is empty (0 bytes): no rows to read")
    if file.suffix == ".jsonl":
        return _read_jsonl(file, key, limit)
    try:
        return _to_rows(load_dataset(builder, data_files=str(file), split="train"), limit)
    except Exception as err:  # a parse error deep in pyarrow: report it in one line
        raise DataConfigError(f"{key}: cannot read {file}: {_one_line(err)}") from err


def _read_jsonl(file: Path, key: str, limit: int | None) -> list[Row]:
    """One JSON object per line; blank lines are skipped, anything else that is not an object is
    an error naming the line."""
    rows: list[Row] = []
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # -sig: a leading BOM is not data
            except UnicodeDecodeError as err:
                raise DataConfigError(
                    f"{key}: {file} line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "re-save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip())  # the newline would move the reported column to the next line
            except json.JSONDecodeError as err:
                raise DataConfigError(f"{key}: {file} line {number}: malformed JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(row, dict):
                raise DataConfigError(f"{key}: {file} line {number}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataConfigError(f"{key}: {file} holds no rows (only blank lines)")
    return rows


def _read_hub(
    name: str, subset: str | None, split: str, key: str, limit: int | None, subdirs: Sequence[str]
) -> tuple[list[Row], str]:
    """A hub dataset; when the hub cannot be reached, only a cached copy, so an offline machine
    fails in seconds rather than after `datasets`' retries (about 40 s)."""
    label = f"hub dataset {name!r}"
    offline = hub_offline_reason()
    if offline is None:
        return _read_with_datasets(name, subset, split, key, limit, label)
    folder = f"{subdirs[0]}/" if subdirs else ""
    hint = (
        f"point {key} at a local copy: a .jsonl/.json/.parquet file, or a directory holding {folder}{split}.jsonl "
        f"(e.g. {key}=/path/to/data); `llmrl eval` takes it as --data"
    )
    try:
        with offline_datasets():
            dataset = load_dataset(name, subset, split=split)
    except Exception as err:  # noqa: BLE001 - no cached copy (or a broken one): the hint is what helps
        raise DataConfigError(
            f"{key}: cannot load split {split!r} of {label}: the hub is unreachable ({offline}) and there is no "
            f"cached copy ({_one_line(err)}); {hint}"
        ) from err
    return _to_rows(dataset, limit), f"{label} [{split}] (cached copy, offline)"


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
