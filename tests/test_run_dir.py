"""A run directory belongs to one run: refusal of a second run, the lock, resume checks against the
first recipe, checkpoint manifests and the fallback past a damaged checkpoint, and operating-system
errors as one line. Real tiny-model runs through the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmrl.checkpoint import CheckpointDamaged, verify_checkpoint
from llmrl.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
TINY = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
    "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]",
]


def train_cli(out: Path, *extra: str) -> int:
    return main(["train", QUICKSTART, *TINY, f"output_dir={out}", *extra])


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_used_directory_is_refused_and_overwrite_clears_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "train.steps=2", "checkpoint.every=1") == 0
    capsys.readouterr()
    # Before: the second run appended to metrics.jsonl, overwrote recipe.yaml, and keep_last kept
    # the old run's step_2 over the new run's step_1.
    assert train_cli(out, "train.steps=1", "seed=5") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert steps_logged(out) == [1, 2]
    assert train_cli(out, "train.steps=1", "seed=5", "--overwrite") == 0
    assert steps_logged(out) == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert "seed: 5" in (out / "recipe.yaml").read_text()


def test_overwrite_deletes_only_what_llmrl_wrote(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train_cli(out, "train.steps=1") == 0
    assert train_cli(out, "train.steps=1", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_a_second_process_cannot_train_into_a_locked_directory_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    # A live holder: another process holding the lock, as a second trainer would.
    hold = (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, json.dumps({'pid': 4242, 'host': 'gpu-node-7'}).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_cli(out, "train.steps=1") == 2
        err = capsys.readouterr().err
        assert "in use by another training process (pid 4242 on host gpu-node-7)" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file stays, the lock is gone with it.
    (out / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
    assert train_cli(out, "train.steps=1") == 0
    assert f"taking over a stale lock in {out} (pid {holder.pid}" in capsys.readouterr().err
    assert not (out / "run.lock").exists()  # released at the end


def test_resume_before_the_first_checkpoint_starts_clean_without_duplicate_rows(tmp_path):
    out = tmp_path / "run"
    assert train_cli(out, "train.steps=2") == 0
    shutil.rmtree(out / "checkpoints")  # as if killed after logging two steps, before any save
    assert train_cli(out, "train.steps=3", "--resume") == 0
    assert steps_logged(out) == [1, 2, 3]  # before: [1, 2, 1, 2, 3]


def test_resume_refuses_experiment_changes_and_records_operational_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "train.steps=1") == 0
    first = (out / "recipe.yaml").read_text()
    capsys.readouterr()
    # Before: train.lr was silently ignored on resume (the optimizer state brings the old one back)
    # while recipe.yaml claimed the new value.
    assert train_cli(out, "train.steps=2", "train.lr=0.001", "algorithm.name=rloo", "--resume") == 2
    err = capsys.readouterr().err
    recipe_lr = yaml.safe_load(Path(QUICKSTART).read_text())["train"]["lr"]
    assert f"train.lr: {recipe_lr!r} -> 0.001" in err and "algorithm.name: 'grpo' -> 'rloo'" in err and "Traceback" not in err
    assert steps_logged(out) == [1]
    assert train_cli(out, "train.steps=2", "logging.rollouts_every=0", "--resume") == 0
    assert (out / "recipe.yaml").read_text() == first
    kept = (out / "recipe.resume-1.yaml").read_text()
    assert kept.startswith("# resume 1, from step_1; changed: logging.rollouts_every: 1 -> 0, train.steps: 1 -> 2\n")
    assert steps_logged(out) == [1, 2]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert train_cli(out, "train.steps=2", "checkpoint.every=1") == 0
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # hundreds of MB; a small CI disk fills otherwise


@pytest.mark.parametrize("damage", ["truncate", "delete"])
@pytest.mark.parametrize("name", ["trainer_state.pt", "rng.pt", "loop_state.json", "policy/model.safetensors"])
def test_the_manifest_catches_a_truncated_or_deleted_file(two_checkpoints, tmp_path, name, damage):
    ckpt = tmp_path / "step_2"
    shutil.copytree(two_checkpoints / "checkpoints" / "step_2", ckpt)
    verify_checkpoint(ckpt)
    target = ckpt / name
    if damage == "truncate":
        with target.open("r+b") as f:
            f.truncate(target.stat().st_size // 2)
    else:
        target.unlink()
    with pytest.raises(CheckpointDamaged, match=name.replace(".", r"\.")):
        verify_checkpoint(ckpt)


def test_a_flipped_byte_is_caught_by_the_checksum(two_checkpoints, tmp_path):
    ckpt = tmp_path / "step_2"
    shutil.copytree(two_checkpoints / "checkpoints" / "step_2", ckpt)
    with (ckpt / "rng.pt").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointDamaged, match="rng.pt does not match its checksum"):
        verify_checkpoint(ckpt)


def test_resume_falls_back_past_a_damaged_checkpoint_and_cleans_temporaries(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "run.lock").unlink(missing_ok=True)
    with (out / "checkpoints" / "step_2" / "trainer_state.pt").open("r+b") as f:
        f.truncate(10)
    (out / "checkpoints" / ".step_3.tmp").mkdir()  # a crash mid-save left it
    (out / "checkpoints" / ".step_3.tmp" / "rng.pt").write_bytes(b"half")
    assert train_cli(out, "train.steps=3", "checkpoint.every=1", "--resume") == 0
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step_2 is damaged (trainer_state.pt has 10 bytes" in err
    assert f"resumed from {out / 'checkpoints' / 'step_1'} (step 1)" in err
    assert steps_logged(out) == [1, 2, 3]
    assert not (out / "checkpoints" / ".step_3.tmp").exists()
    verify_checkpoint(out / "checkpoints" / "step_3")


def test_resume_with_every_checkpoint_damaged_is_refused_not_restarted(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for step in (1, 2):
        (out / "checkpoints" / f"step_{step}" / "rng.pt").unlink()
    assert train_cli(out, "train.steps=3", "--resume") == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_1").exists() and steps_logged(out) == [1, 2]


def test_an_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert train_cli(target, "train.steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llmrl: error: output_dir {target} is a file, not a directory; pick another output_dir"


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


def test_an_unwritable_output_dir_is_a_one_line_error(tmp_path, capsys):
    # Root ignores file modes, so the read-only filesystem is a mount.
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")
    try:
        assert train_cli(ro / "run", "train.steps=1") == 2
        assert capsys.readouterr().err.strip() == f"llmrl: error: output_dir {ro / 'run'} cannot be created: Read-only file system"
    finally:
        subprocess.run(["umount", str(ro)])


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_every_good_file_intact(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=60m")  # room for one tiny checkpoint (42 MB), not two
    try:
        out = disk / "run"
        args = [sys.executable, "-m", "llmrl.cli", "train", QUICKSTART, *TINY, f"output_dir={out}"]
        assert subprocess.run(args + ["train.steps=1"], capture_output=True).returncode == 0
        before = {name: (out / name).read_bytes() for name in ("recipe.yaml", "metrics.jsonl")}
        done = subprocess.run(args + ["train.steps=2", "--resume"], capture_output=True, text=True)
        assert done.returncode == 1, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("llmrl: error: No space left on device") and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert (out / "recipe.yaml").read_bytes() == before["recipe.yaml"]
        assert (out / "metrics.jsonl").read_bytes().startswith(before["metrics.jsonl"])
        verify_checkpoint(out / "checkpoints" / "step_1")
        assert not list((out / "checkpoints").glob(".step_*.tmp"))  # its space given back
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_kill_9_then_resume_ends_on_the_weights_of_an_uninterrupted_run(tmp_path):
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    # A tiny step takes ~0.1 s, so the rest of the run could finish before a timed kill. This
    # reward (0 for every sample, so the runs train as with `arithmetic` alone) holds the killed
    # process inside step 3's scoring once step 2's checkpoint exists: the kill always lands there.
    (tmp_path / "hold.py").write_text(
        "import os, time\n"
        "def hold(completion, task):\n"
        "    if os.path.exists(os.environ.get('HOLD_AFTER', '/nonexistent')):\n"
        "        time.sleep(120)\n"
        "    return 0.0\n"
    )
    common = [*TINY, "train.lr=1e-3", "train.steps=6", "checkpoint.every=2", f"reward.functions=[arithmetic, {tmp_path / 'hold.py'}:hold]"]
    assert main(["train", QUICKSTART, *common, f"output_dir={straight}"]) == 0
    env = {**os.environ, "HOLD_AFTER": str(split / "checkpoints" / "step_2")}
    proc = subprocess.Popen([sys.executable, "-m", "llmrl.cli", "train", QUICKSTART, *common, f"output_dir={split}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not (split / "checkpoints" / "step_2").exists():
        time.sleep(0.2)
    time.sleep(1.0)  # into step 3: its rows and rollouts may be half-written
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (split / "run.lock").exists()  # left behind by the dead process; its lock went with it
    assert main(["train", QUICKSTART, *common, f"output_dir={split}", "--resume"]) == 0
    assert steps_logged(split) == [1, 2, 3, 4, 5, 6]
    final = "checkpoints/step_6/policy/model.safetensors"
    wa, wb = load_file(straight / final), load_file(split / final)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
