"""The reward sandbox where privileges are missing (what it records, what still holds), and how it
chooses the uid its workers run as."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from test_reward_sandbox import HOSTILE_SOURCE

UNPRIVILEGED_TRAINER = textwrap.dedent(
    """
    # A trainer run as uid 65534 inside a user namespace whose limit on nested user namespaces is
    # 0: no root, and no unprivileged namespaces either (as with user.max_user_namespaces=0).
    import ctypes, json, multiprocessing.popen_fork, os, signal, socket, subprocess, sys, tempfile
    from llmrl.reward import RewardComputer, RewardConfig
    from llmrl.types import Span, Task, Trajectory

    plugin, target = sys.argv[1], sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:
        os.read(ready_r, 1)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child}/{name}", "w") as handle:
                handle.write("0 0 65536")
        os.write(go_w, b"x")
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    assert libc.unshare(0x10000000) == 0  # CLONE_NEWUSER
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as handle:
        handle.write("0")
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    task = Task(task_id="t0", messages=[{"role": "user", "content": "q"}], answer="1", meta={"path": target})
    trajectory = Trajectory(task=task, token_ids=[1, 2, 3, 4], spans=[Span("prompt", 0, 2), Span("policy", 2, 4)],
                            rollout_logprobs=[0.0] * 4, finish_reason="stop", group_id=0, completion_text="x")
    functions = [f"{plugin}:{name}" for name in ("write_private", "write_to", "sigterm_default")]
    signal.signal(signal.SIGTERM, lambda *_: None)
    with RewardComputer(RewardConfig(functions=functions, num_workers=1)) as rewards:
        parts = rewards.score([trajectory])[0].parts
        print(json.dumps({"parts": parts, "guarantees": rewards.sandbox_guarantees}), flush=True)
    os._exit(0)
    """
)


def test_without_privileges_or_user_namespaces_the_rest_still_holds() -> None:
    if os.geteuid() != 0:
        pytest.skip("building the unprivileged setting needs root")
    # Files uid 65534 can read and a directory it can write: only the sandbox could stop it.
    shared = Path(tempfile.mkdtemp(prefix="llmrl-test-unpriv-"))
    try:
        shared.chmod(0o777)
        (shared / "hostile_rewards.py").write_text(HOSTILE_SOURCE)
        (shared / "trainer.py").write_text(UNPRIVILEGED_TRAINER)
        target = shared / "written.txt"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, str(shared / "trainer.py"), str(shared / "hostile_rewards.py"), str(target)],
            cwd=shared, env=env, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        guarantees, parts = report["guarantees"], report["parts"]
        # Recorded as missing, with the reason, not failed:
        for name in ("read_only_fs", "no_network", "pid_namespace"):
            assert guarantees[name].startswith("no namespaces"), guarantees[name]
        assert guarantees["unprivileged_uid"].startswith("not root")
        # and what needs no privilege still holds.
        for name in ("process_group", "trainer_death", "private_dir", "memory_limit", "file_size_limit"):
            assert guarantees[name] == "on", name
        assert parts["write_private"] == 1.0 and parts["sigterm_default"] == 1.0
        # The documented gap: a write the user's own permissions allow goes through.
        assert parts["write_to"] == 0.0 and target.exists()
        assert "not in force: read_only_fs" in out.stderr  # the warning says so
    finally:
        shutil.rmtree(shared)


def test_auto_user_is_nobody_only_when_others_can_read_the_imports() -> None:
    from llmrl.reward.sandbox import choose_user

    base = Path(tempfile.mkdtemp(prefix="llmrl-test-perm-"))
    try:
        package = base / "pkg"
        package.mkdir()
        (package / "plugin.py").write_text("")
        base.chmod(0o711)  # others may enter, not list: enough on the way to a path
        package.chmod(0o755)
        (package / "plugin.py").chmod(0o644)
        assert choose_user("auto", [str(package), str(package / "plugin.py")]) == ("nobody", "auto")
        (package / "plugin.py").chmod(0o600)
        user, why = choose_user("auto", [str(package / "plugin.py")])
        assert user == "same" and str(package / "plugin.py") in why
        package.chmod(0o750)  # a sys.path directory others cannot list
        assert choose_user("auto", [str(package)])[0] == "same"
        base.chmod(0o700)
        user, why = choose_user("auto", [str(package)])
        assert user == "same" and why.startswith(f"{base} is not readable by other users")
        assert choose_user("nobody", [str(package)])[0] == "nobody"  # asked for explicitly
    finally:
        base.chmod(0o755)
        package.chmod(0o755)
        shutil.rmtree(base)
