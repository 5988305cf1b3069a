"""Checkpoints: an HF policy directory plus everything needed to resume exactly.

Layout: output_dir/checkpoints/step_N/{policy/, trainer_state.pt, loop_state.json, rng.pt, critic/ (PPO),
manifest.json}. trainer_state.pt points at policy/ for the weights wherever the export holds
them exactly (a plain torch-backend policy), so they are stored once. A checkpoint is written
under a temporary name and renamed into place, so a crash mid-write leaves the previous
checkpoint intact and never a half-written one that resume would pick. The manifest (every file's size and SHA-256) is written last; resume verifies it, so a file
truncated or deleted afterwards (a full disk, a careless cleanup) is caught before it is loaded.
"""
from __future__ import annotations

import errno
import hashlib
import os
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmrl.train.engine import TrainEngine

STEP_DIR = re.compile(r"^step_(\d+)$")
TEMP_DIR = re.compile(r"^\.step_(\d+)\.tmp$")
MANIFEST = "manifest.json"


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its manifest; the message names the file."""


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_root(run_dir)
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "loop_state.json").exists()]
    return sorted(found)


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every step_N directory, intact or not, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.exists():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Half-written checkpoints that a crash left under their temporary names."""
    root = checkpoints_root(run_dir)
    stale = [p for p in root.iterdir() if TEMP_DIR.match(p.name)] if root.exists() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_checkpoint(directory: Path) -> None:
    """Raise CheckpointDamaged naming the first file that is missing, short or altered."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointDamaged(f"{MANIFEST} is missing") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointDamaged(f"{MANIFEST} is unreadable") from None
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointDamaged(f"{name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointDamaged(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointDamaged(f"{name} does not match its checksum")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    engine: TrainEngine,
    tokenizer: Any,
    loop_state: dict[str, Any],
    keep_last: int,
    with_optimizer: bool = True,
    companions: dict[str, TrainEngine] | None = None,
) -> Path:
    """`companions` are further train engines (the PPO critic) saved under their names for resume."""
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        engine.save_policy(tmp / "policy")
        tokenizer.save_pretrained(str(tmp / "policy"))
        if with_optimizer:
            engine.save(tmp)
            for name, companion in (companions or {}).items():
                (tmp / name).mkdir()
                companion.save(tmp / name)
            torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "loop_state.json").write_text(json.dumps({**loop_state, "step": step}, indent=2))
        write_manifest(tmp)
    except BaseException as err:
        full = not isinstance(err, OSError) and _disk_full(root)
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back; older checkpoints stay
        if full:
            # torch.save's zip writer reports a full disk as a RuntimeError about file positions.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from err
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(path: Path) -> bool:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize < (1 << 20)


def load_checkpoint(directory: Path, engine: TrainEngine, companions: dict[str, TrainEngine] | None = None) -> dict[str, Any]:
    """Restore engine, companion engines and RNG state; return the loop state (step, sampler position...)."""
    if not (directory / "trainer_state.pt").exists():
        raise ValueError(f"checkpoint {directory} has no trainer state (saved with checkpoint.save_optimizer=false); cannot resume")
    engine.load(directory)
    for name, companion in (companions or {}).items():
        if not (directory / name).is_dir():
            raise ValueError(f"checkpoint {directory} has no {name} state; it was written by a run without a {name}")
        companion.load(directory / name)
    restore_rng(torch.load(directory / "rng.pt", weights_only=False))
    return json.loads((directory / "loop_state.json").read_text())
