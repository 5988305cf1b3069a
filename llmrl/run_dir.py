"""A run directory belongs to one run.

Opening a run directory for training claims it with a lock (one training process at a time),
clears what a crash left half-written, and settles what to start from:
- a fresh run in a directory that already holds a run is refused, unless `--overwrite` clears it;
- `--resume` picks the newest intact checkpoint (see checkpoint.verify_checkpoint) and checks the
  recipe against the run's first one: keys that change the experiment are refused, operational
  keys (steps, logging, checkpoint cadence, eval, timeouts) may change and are recorded;
- `--resume` before any checkpoint was written starts clean, dropping the old rows.
The first recipe is never overwritten: each resume's recipe is kept beside it.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmrl.checkpoint import CheckpointDamaged, checkpoint_dirs, checkpoints_root, remove_stale_temporaries, verify_checkpoint
from llmrl.fileio import write_atomically
from llmrl.recipe import Recipe, dump_recipe, resolve_recipe
from llmrl.tracking import METRICS_FILE

RECIPE_FILE = "recipe.yaml"
LOCK_FILE = "run.lock"
# What llmrl writes into a run directory; --overwrite deletes these and nothing else, so an
# output_dir pointed at a folder holding other files never loses them.
RUN_ARTEFACTS = (RECIPE_FILE, METRICS_FILE, "checkpoints", "rollouts", "tensorboard", "eval", "wandb", "cluster.json")
RESUME_RECIPE_GLOB = "recipe.resume-*.yaml"

# Keys a resume may change: they decide how long, how often and where, not what is learned.
# Everything else (model, algorithm, data, reward functions, seed, batch shape, optimiser) is the
# experiment, and changing it mid-run would make the run's record describe no single experiment.
SAFE_ON_RESUME = (
    "train.steps", "train.micro_batch_size", "train.micro_batch_tokens", "logging.", "checkpoint.", "eval.", "resume", "output_dir",
    "reward.timeout_s", "reward.num_workers", "cluster.address", "cluster.timeouts.", "cluster.num_cpus", "cluster.object_store_mb",
)


class RunDirError(ValueError):
    """The run directory cannot be used as asked: the message says why and what to do instead."""


@dataclass
class OpenRun:
    """A claimed run directory and the checkpoint to resume from (None: start at step 0)."""

    path: Path
    checkpoint: Path | None
    lock_fd: int

    def release(self) -> None:
        try:
            os.close(self.lock_fd)  # closing drops the lock
        except OSError:
            pass
        (self.path / LOCK_FILE).unlink(missing_ok=True)


def open_run_dir(recipe: Recipe, overwrite: bool = False) -> OpenRun:
    run_dir = Path(recipe.output_dir)
    _make_dir(run_dir)
    lock_fd = _claim(run_dir)
    try:
        remove_stale_temporaries(run_dir)
        checkpoint = _settle(run_dir, recipe, overwrite)
    except BaseException:
        os.close(lock_fd)
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        raise
    return OpenRun(run_dir, checkpoint, lock_fd)


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (RECIPE_FILE, METRICS_FILE, "checkpoints"))


# ------------------------------------------------------------------------------ parts


def _make_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} is a file, not a directory; pick another output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"output_dir {run_dir} cannot be created: {err.strerror}") from None
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"output_dir {run_dir} is not writable: {err.strerror}") from None


def _claim(run_dir: Path) -> int:
    """An exclusive lock on run.lock, which records the holder's pid and host. The kernel drops
    it when its process dies, however it dies, so a lock file left by a dead process is simply
    taken over. A POSIX record lock (lockf), not flock: forked children (reward workers) do not
    inherit it, so one that outlives a killed trainer cannot keep its directory locked."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirError(
            f"output_dir {run_dir} is in use by another training process ({holder}); "
            "wait for it to finish, stop it, or pick another output_dir"
        ) from None
    previous = _read_holder(fd)
    if previous != "unknown":
        print(f"llmrl: taking over a stale lock in {run_dir} ({previous}, no longer running)", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {info['pid']} on host {info['host']}"
    except (ValueError, TypeError, KeyError, OSError):
        return "unknown"


def _settle(run_dir: Path, recipe: Recipe, overwrite: bool) -> Path | None:
    """Clear, check and write the recipe; return the checkpoint to resume from."""
    if overwrite:
        _clear(run_dir)
    if recipe.resume == "never":
        if holds_run(run_dir):
            raise RunDirError(
                f"output_dir {run_dir} already holds a run; continue it with --resume, pick a new output_dir, "
                "or pass --overwrite to delete it first"
            )
        write_atomically(run_dir / RECIPE_FILE, dump_recipe(recipe))
        return None
    checkpoint = _resume_point(run_dir, recipe.resume)
    if checkpoint is None:
        if holds_run(run_dir):
            print(f"llmrl: {run_dir} has no intact checkpoint yet; starting the run again from step 0", file=sys.stderr)
            _clear(run_dir)
        write_atomically(run_dir / RECIPE_FILE, dump_recipe(recipe))
        return None
    if (run_dir / RECIPE_FILE).exists():
        _check_resume_recipe(run_dir, recipe, checkpoint)
    else:
        write_atomically(run_dir / RECIPE_FILE, dump_recipe(recipe))
    return checkpoint


def _clear(run_dir: Path) -> None:
    for name in RUN_ARTEFACTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for resumed in run_dir.glob(RESUME_RECIPE_GLOB):
        resumed.unlink()


def _resume_point(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest checkpoint that verifies, warning about each damaged one passed over;
    an explicit path must verify."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise RunDirError(f"resume: checkpoint directory {path} does not exist")
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as err:
            raise RunDirError(f"resume: checkpoint {path} is damaged: {err}") from None
        return path
    found = checkpoint_dirs(run_dir)
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as err:
            print(f"llmrl: warning: checkpoint {path} is damaged ({err}); falling back to the one before it", file=sys.stderr)
            continue
        return path
    if found:
        # Never start over on top of checkpoints that merely failed to verify: they may be all
        # that is left of a long run, and a person should decide.
        raise RunDirError(f"--resume: no checkpoint in {checkpoints_root(run_dir)} is intact (see the warnings above); "
                          "restore one, or start over with --overwrite")
    return None


def _check_resume_recipe(run_dir: Path, recipe: Recipe, checkpoint: Path) -> None:
    first_text = (run_dir / RECIPE_FILE).read_text()
    try:
        first = resolve_recipe(Recipe.model_validate(yaml.safe_load(first_text)))
    except Exception as err:  # noqa: BLE001 - any parse or schema failure means we cannot compare
        raise RunDirError(f"{run_dir / RECIPE_FILE} cannot be read back ({type(err).__name__}); restore it, or start over with --overwrite") from None
    changed = _changed_keys(_flatten(first.model_dump(mode="json")), _flatten(recipe.model_dump(mode="json")))
    changed.pop("resume", None)  # it always differs: that is what makes this a resume
    refused = {k: v for k, v in changed.items() if not k.startswith(SAFE_ON_RESUME)}
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise RunDirError(
            f"--resume with a recipe that changes the experiment ({lines}); these keys must match the run's "
            f"{RECIPE_FILE}. Resume with the original values, or start a new run in another output_dir"
        )
    index = len(list(run_dir.glob(RESUME_RECIPE_GLOB))) + 1
    header = f"# resume {index}, from {checkpoint.name}; changed: " + (", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changed.items()) or "nothing")
    write_atomically(run_dir / f"recipe.resume-{index}.yaml", header + "\n" + dump_recipe(recipe))
    if changed:
        print(f"llmrl: resuming with changed settings ({header.split('changed: ', 1)[1]}); kept in recipe.resume-{index}.yaml", file=sys.stderr)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
