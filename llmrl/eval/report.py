"""What an evaluation leaves behind: samples.jsonl, per_item.jsonl, results.json, a console table.

Layout of an output directory:

    results.json              metrics of every benchmark, the recipe, model and data identities
    <bench>/samples.jsonl     one row per sample, appended and flushed after every batch
    <bench>/per_item.jsonl    one row per item: task_id, num_correct out of n
    <bench>/fingerprint.json  what produced the samples; --resume refuses a different one
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

SAMPLES_FILE = "samples.jsonl"
PER_ITEM_FILE = "per_item.jsonl"
RESULTS_FILE = "results.json"
FINGERPRINT_FILE = "fingerprint.json"


class SampleWriter:
    """Appends sample rows; each `write` ends with a flush, so Ctrl-C keeps finished batches."""

    def __init__(self, path: Path, rows_to_keep: list[dict[str, Any]] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if rows_to_keep is None:
            self._handle: TextIO = path.open("w")
        else:
            # Rewrite what resume keeps: drops a half-written last line left by a hard kill.
            tmp = path.with_suffix(".tmp")
            with tmp.open("w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows_to_keep)
            os.replace(tmp, path)
            self._handle = path.open("a")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        self._handle.writelines(json.dumps(row) + "\n" for row in rows)
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a jsonl file; a line cut short by a kill mid-write is skipped, not fatal."""
    if not path.exists():
        return
    with path.open() as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)  # a full disk fails the temporary, never the file already there


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written results file


# ---------------------------------------------------------------- console


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def summary_table(benches: dict[str, dict[str, Any]]) -> str:
    """One row per benchmark: accuracy metrics in percent, then length, truncation, throughput.

    `benches` maps a name to its entry of results.json (`metrics`, `run`, `breakdown`).
    """
    accuracy_keys: list[str] = []
    for entry in benches.values():
        for key in entry["metrics"]:
            if key.startswith(("pass@", "maj@")) and key not in accuracy_keys:
                accuracy_keys.append(key)
    accuracy_keys.sort(key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1])))
    header = ["bench", "items", "n", *accuracy_keys, "extracted%", "len", "trunc%", "samples/s", "tok/s", "time_s"]
    rows = [header]
    for name, entry in benches.items():
        m, run = entry["metrics"], entry["run"]
        rows.append(
            [
                name,
                str(int(m["items"])),
                str(int(m["n"])),
                *[_fmt(m.get(k), percent=True) for k in accuracy_keys],
                _fmt(m.get("extracted_frac"), percent=True),
                _fmt(m.get("response_tokens_mean")),
                _fmt(m.get("truncated_frac"), percent=True),
                f"{run['samples_per_s']:.2f}",
                f"{run['tokens_per_s']:.1f}",
                f"{run['time_s']:.0f}",
            ]
        )
    lines = _align(rows)
    for name, entry in benches.items():
        for key, groups in entry.get("breakdown", {}).items():
            lines.append("")
            lines.append(f"{name} pass@1 by {key}:")
            table = [[key, "items", "pass@1"]] + [
                [label, str(int(v["items"])), _fmt(v["pass@1"], percent=True)] for label, v in groups.items()
            ]
            lines.extend("  " + line for line in _align(table))
    return "\n".join(lines)


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
