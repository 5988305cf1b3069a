"""The reward sandbox: each guarantee tried by a hostile reward against real processes, files,
sockets and signals. A guarantee the machine's privileges do not allow is skipped, by name."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from llmrl.reward import RewardComputer, RewardConfig
from llmrl.types import Span, Task, Trajectory

from conftest import REPO

HOSTILE_SOURCE = textwrap.dedent(
    """
    import os, signal, socket, subprocess, sys, time

    def constant(completion, task):
        return 1.0

    def write_to(completion, task):
        try:
            with open(task.meta["path"], "w") as handle:
                handle.write("written by a reward")
            return 0.0
        except OSError as exc:
            return float(exc.errno)

    def write_private(completion, task):
        home = os.environ["HOME"]
        with open("scratch.txt", "w") as handle:
            handle.write("ok")
        same = os.getcwd() == home == os.environ["TMPDIR"]
        return 1.0 if same and os.path.exists(os.path.join(home, "scratch.txt")) else 0.0

    def connect(completion, task):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", int(task.meta["port"])))
            return 0.0
        except OSError as exc:
            return float(exc.errno)

    def kill_trainer(completion, task):
        codes = {}
        for name, call, target in (
            ("kill_pid", os.kill, int(task.meta["pid"])),
            ("kill_group", os.killpg, int(task.meta["pgid"])),
        ):
            try:
                call(target, signal.SIGKILL)
                codes[name] = 0.0
            except OSError as exc:
                codes[name] = float(exc.errno)
        return {"score": 1.0, **codes}

    def hog(completion, task):
        return float(len(bytearray(int(task.meta["mb"]) * 1024 * 1024)))

    def spin(completion, task):
        while True:
            pass

    def orphan(completion, task):
        # A grandchild in a session of its own: out of reach of a process-group kill. Its marker
        # comes reversed, so that the trainer's own command line does not hold it.
        marker = task.meta["marker_reversed"][::-1]
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)", marker], start_new_session=True)
        if completion == "hang":
            time.sleep(1000)
        return 1.0

    def fork_many(completion, task):
        count = 0
        for _ in range(int(task.meta["tries"])):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(1000)
                os._exit(0)
            count += 1
        return float(count)

    def sigterm_default(completion, task):
        return 1.0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 0.0

    def big_file(completion, task):
        with open("big.bin", "wb") as handle:
            handle.write(bytes(int(task.meta["mb"]) * 1024 * 1024))
        return 1.0

    def many_files(completion, task):
        written = 0
        for index in range(int(task.meta["files"])):
            try:
                with open(f"part{index}.bin", "wb") as handle:
                    handle.write(bytes(int(task.meta["mb"]) * 1024 * 1024))
            except OSError:
                break
            written += 1
        return float(written)

    def inherited_fd_write(completion, task):
        # Writing through a descriptor the trainer had open would bypass the read-only mount.
        written = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == task.meta["path"]:
                    written += os.write(int(name), b"written through an inherited descriptor")
            except OSError:
                pass
        return float(written)

    def poke_shared_memory(completion, task):
        import ctypes
        ctypes.memmove(int(task.meta["address"]), b"PWNED", 5)  # unmapped in a sandboxed worker: SIGSEGV
        return 1.0

    def capabilities(completion, task):
        with open("/proc/self/status") as status:
            effective = [line.split()[1] for line in status if line.startswith("CapEff")][0]
        return float(int(effective, 16))

    def remount_then_write(completion, task):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.mount(None, b"/", None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND: read-write again
        return {"score": 1.0, "remount_errno": float(ctypes.get_errno() if failed else 0), "write_errno": write_to(completion, task)}

    def devices(completion, task):
        return float(len(os.listdir("/dev")))
    """
)

TRAINER_SOURCE = textwrap.dedent(
    """
    import json, os, sys, time
    from llmrl.reward import RewardComputer, RewardConfig
    from llmrl.types import Span, Task, Trajectory

    plugin, fn, completion, meta, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
    meta.update(pid=os.getpid(), pgid=os.getpgid(0))
    task = Task(task_id="t0", messages=[{"role": "user", "content": "q"}], answer="1", meta=meta)
    trajectory = Trajectory(task=task, token_ids=[1, 2, 3, 4], spans=[Span("prompt", 0, 2), Span("policy", 2, 4)],
                            rollout_logprobs=[0.0] * 4, finish_reason="stop", group_id=0, completion_text=completion)
    with RewardComputer(RewardConfig(functions=[f"{plugin}:{fn}"], num_workers=1, **settings)) as rewards:
        print(json.dumps(rewards.score([trajectory])[0].parts), flush=True)
    """
)


@pytest.fixture()
def hostile(tmp_path: Path) -> str:
    path = tmp_path / "hostile_rewards.py"
    path.write_text(HOSTILE_SOURCE)
    return str(path)


@pytest.fixture(scope="module")
def guarantees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the sandbox enforces on this machine (as root: all of it)."""
    path = tmp_path_factory.mktemp("probe") / "probe_rewards.py"
    path.write_text(HOSTILE_SOURCE)
    with RewardComputer(RewardConfig(functions=[f"{path}:constant"], num_workers=1)) as rewards:
        rewards.score([make_trajectory()])
        return rewards.sandbox_guarantees


def need(guarantees: dict[str, str], *names: str) -> None:
    for name in names:
        if not guarantees.get(name, "").startswith("on"):
            pytest.skip(f"sandbox guarantee {name} is not in force here: {guarantees.get(name)}")


def make_trajectory(completion: str = "x", **meta: object) -> Trajectory:
    task = Task(task_id="t0", messages=[{"role": "user", "content": "q"}], answer="1", meta=meta)
    return Trajectory(
        task=task, token_ids=[1, 2, 3, 4], spans=[Span("prompt", 0, 2), Span("policy", 2, 4)],
        rollout_logprobs=[0.0] * 4, finish_reason="stop", group_id=0, completion_text=completion,
    )


def score(plugin: str, fn: str, completion: str = "x", meta: dict | None = None, **settings: object):
    """One call through a fresh pool: (parts, metrics)."""
    settings.setdefault("num_workers", 1)
    with RewardComputer(RewardConfig(functions=[f"{plugin}:{fn}"], **settings)) as rewards:
        result = rewards.score([make_trajectory(completion, **(meta or {}))])[0]
        return result.parts, rewards.metrics()


def run_trainer(plugin: str, fn: str, completion: str = "x", meta: dict | None = None, **settings: object) -> subprocess.Popen:
    """A separate trainer process (its own session, so a reward that kills its group cannot reach
    pytest) that scores one trajectory and prints the parts as JSON."""
    script = Path(plugin).with_name("trainer.py")
    script.write_text(TRAINER_SOURCE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), plugin, fn, completion, json.dumps(meta or {}), json.dumps(settings)]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def live_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes() and _state(int(entry.name)) != "Z":
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def alive(pids: set[int] | list[int]) -> list[int]:
    return [pid for pid in pids if _state(pid) not in (None, "Z")]


def wait_until(condition, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ---------------------------------------------------------------- files


def test_every_guarantee_is_reported(guarantees: dict[str, str]) -> None:
    from llmrl.reward.sandbox import GUARANTEES

    assert set(guarantees) == set(GUARANTEES)
    assert guarantees["process_group"] == guarantees["private_dir"] == guarantees["trainer_death"] == "on"
    if os.geteuid() == 0:  # as root every wall is up (NPROC aside when the worker keeps uid 0)
        for name in ("read_only_fs", "no_network", "pid_namespace", "memory_limit", "file_size_limit"):
            assert guarantees[name] == "on", (name, guarantees[name])


def test_reward_cannot_write_outside_its_private_dir(hostile: str, tmp_path: Path, guarantees: dict[str, str]) -> None:
    need(guarantees, "read_only_fs")
    # A world-writable directory, so only the read-only mount (not file permissions) can stop the write.
    open_dir = Path(tempfile.mkdtemp(prefix="llmrl-test-open-"))
    try:
        open_dir.chmod(0o777)
        for target in (open_dir / "escape.txt", tmp_path / "run_dir_file.txt"):
            parts, _ = score(hostile, "write_to", meta={"path": str(target)})
            assert parts["write_to"] in (errno.EROFS, errno.EACCES) and not target.exists()
        parts, _ = score(hostile, "write_to", meta={"path": str(open_dir / "escape.txt")})
        assert parts["write_to"] == errno.EROFS  # the mount, not a permission, refused it
        # The same reward with the sandbox off writes the file: the test can tell the difference.
        parts, _ = score(hostile, "write_to", meta={"path": str(open_dir / "escape.txt")}, sandbox=False)
        assert parts["write_to"] == 0.0 and (open_dir / "escape.txt").read_text() == "written by a reward"
    finally:
        shutil.rmtree(open_dir)


@pytest.mark.parametrize("sandbox_user", ["same", "nobody"])
def test_reward_cannot_undo_the_read_only_mount(hostile: str, guarantees: dict[str, str], sandbox_user: str) -> None:
    need(guarantees, "read_only_fs")
    open_dir = Path(tempfile.mkdtemp(prefix="llmrl-test-open-"))
    try:
        open_dir.chmod(0o777)
        parts, _ = score(hostile, "remount_then_write", meta={"path": str(open_dir / "x")}, sandbox_user=sandbox_user)
        assert parts["remount_then_write/remount_errno"] == errno.EPERM  # no CAP_SYS_ADMIN left
        assert parts["remount_then_write/write_errno"] == errno.EROFS and not (open_dir / "x").exists()
    finally:
        shutil.rmtree(open_dir)


def test_reward_cannot_write_through_the_trainers_open_files(hostile: str, tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as handle:  # as the run's metric log is, while rewards are scored
        handle.write("row\n")
        handle.flush()
        parts, _ = score(hostile, "inherited_fd_write", meta={"path": str(log)})
        assert parts["inherited_fd_write"] == 0.0 and log.read_text() == "row\n"
        parts, _ = score(hostile, "inherited_fd_write", meta={"path": str(log)}, sandbox=False)
        assert parts["inherited_fd_write"] == 0.0  # workers keep only their pipe, sandbox or not
        parts, _ = score(hostile, "inherited_fd_write", meta={"path": str(log)}, num_workers=0)
        assert parts["inherited_fd_write"] > 0  # in the trainer itself it is there: the test can tell


def test_reward_cannot_write_the_trainers_shared_memory(hostile: str) -> None:
    import ctypes
    import mmap

    shared = mmap.mmap(-1, 4096)  # MAP_SHARED, as shared-memory tensors are
    shared[:5] = b"clean"
    address = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    try:
        parts, metrics = score(hostile, "poke_shared_memory", meta={"address": address})
        assert parts["poke_shared_memory"] == 0.0 and metrics["reward/errors"] == 1.0 and shared[:5] == b"clean"
        parts, _ = score(hostile, "poke_shared_memory", meta={"address": address}, sandbox=False)
        assert parts["poke_shared_memory"] == 1.0 and shared[:5] == b"PWNED"  # a plain worker reaches it
    finally:
        shared.close()


@pytest.mark.parametrize("sandbox_user", ["auto", "nobody"])
def test_reward_writes_in_its_private_dir_which_close_removes(hostile: str, sandbox_user: str) -> None:
    config = RewardConfig(functions=[f"{hostile}:write_private"], num_workers=1, sandbox_user=sandbox_user)
    rewards = RewardComputer(config)
    assert rewards.score([make_trajectory()])[0].parts["write_private"] == 1.0  # cwd = HOME = TMPDIR, writable
    private_dir = Path(rewards._pool._workers[0].private_dir)  # noqa: SLF001 - its lifetime is the point
    assert private_dir.is_dir()
    rewards.close()
    assert not private_dir.exists()


def test_a_new_pool_removes_private_dirs_of_dead_trainers(hostile: str) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # exited and reaped: no process has this pid (barring reuse)
    stale = Path(tempfile.mkdtemp(prefix=f"llmrl-reward-{dead_pid}-"))
    (stale / "left.txt").write_text("x")  # without namespaces a worker writes to the real directory
    ours = Path(tempfile.mkdtemp(prefix=f"llmrl-reward-{os.getpid()}-"))
    try:
        score(hostile, "constant")
        assert not stale.exists() and ours.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(ours, ignore_errors=True)


def test_private_dir_is_bounded_in_total_not_only_per_file(hostile: str, guarantees: dict[str, str]) -> None:
    need(guarantees, "read_only_fs")  # the bounded tmpfs comes with the mount namespace
    parts, _ = score(hostile, "many_files", meta={"files": 6, "mb": 3}, max_file_mb=8)
    assert parts["many_files"] == 2.0  # files of 3 MB each in an 8 MB directory: the third does not fit


def test_file_size_limit(hostile: str, guarantees: dict[str, str]) -> None:
    need(guarantees, "file_size_limit")
    parts, metrics = score(hostile, "big_file", meta={"mb": 8}, max_file_mb=4)
    assert parts["big_file"] == 0.0 and metrics["reward/errors"] == 1.0
    parts, metrics = score(hostile, "big_file", meta={"mb": 2}, max_file_mb=4)
    assert parts["big_file"] == 1.0 and metrics["reward/failures"] == 0.0


# ---------------------------------------------------------------- network


def test_reward_cannot_reach_the_network(hostile: str, guarantees: dict[str, str]) -> None:
    need(guarantees, "no_network")
    with socket.socket() as server:  # listening on this machine's loopback: reachable from outside the sandbox
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        parts, _ = score(hostile, "connect", meta={"port": port})
        assert parts["connect"] == errno.ENETUNREACH  # the namespace's loopback is down
        parts, _ = score(hostile, "connect", meta={"port": port}, sandbox=False)
        assert parts["connect"] == 0.0


# ---------------------------------------------------------------- signals and processes


@pytest.mark.parametrize("sandbox", [True, False])
def test_reward_cannot_kill_the_trainer(hostile: str, guarantees: dict[str, str], sandbox: bool) -> None:
    if sandbox:
        need(guarantees, "pid_namespace")
    trainer = run_trainer(hostile, "kill_trainer", sandbox=sandbox)
    out, err = trainer.communicate(timeout=60)
    if not sandbox:  # without the sandbox the reward's first kill lands: the trainer is gone
        assert trainer.returncode == -signal.SIGKILL
        return
    assert trainer.returncode == 0, err
    parts = json.loads(out)
    # The trainer's pid and group do not exist in the worker's PID namespace (ESRCH), or belong
    # to another user (EPERM). The trainer lived.
    assert parts["kill_trainer/kill_pid"] in (errno.ESRCH, errno.EPERM)
    assert parts["kill_trainer/kill_group"] in (errno.ESRCH, errno.EPERM)


def test_worker_does_not_inherit_the_trainers_sigterm_handler(hostile: str) -> None:
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as the loop's graceful stop does
    try:
        for sandbox in (True, False):
            parts, _ = score(hostile, "sigterm_default", sandbox=sandbox)
            assert parts["sigterm_default"] == 1.0, sandbox
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_grandchild_in_its_own_session_dies_with_the_worker(hostile: str, guarantees: dict[str, str]) -> None:
    need(guarantees, "pid_namespace")
    # On a timeout: the worker is killed, and with it the grandchild that left the process group.
    marker = f"llmrl-test-{uuid.uuid4().hex}"
    parts, metrics = score(hostile, "orphan", "hang", meta={"marker_reversed": marker[::-1]}, timeout_s=2.0)
    assert metrics["reward/timeouts"] == 1.0
    assert wait_until(lambda: not live_processes_with(marker), 5.0), live_processes_with(marker)
    # On close, after a normal call.
    marker = f"llmrl-test-{uuid.uuid4().hex}"
    with RewardComputer(RewardConfig(functions=[f"{hostile}:orphan"], num_workers=1)) as rewards:
        assert rewards.score([make_trajectory(marker_reversed=marker[::-1])])[0].score == 1.0
        assert wait_until(lambda: bool(live_processes_with(marker)), 10.0)  # it did start
    assert wait_until(lambda: not live_processes_with(marker), 5.0), live_processes_with(marker)


@pytest.mark.parametrize("sandbox", [True, False])
def test_kill_9_of_the_trainer_leaves_nothing_behind(hostile: str, guarantees: dict[str, str], sandbox: bool) -> None:
    if sandbox:
        need(guarantees, "pid_namespace")
    marker = f"llmrl-test-{uuid.uuid4().hex}"
    trainer = run_trainer(hostile, "orphan", "hang", meta={"marker_reversed": marker[::-1]}, timeout_s=600, sandbox=sandbox)
    try:
        assert wait_until(lambda: bool(live_processes_with(marker)), 30.0), "the reward's grandchild never started"
        family = descendants(trainer.pid)
        grandchild = set(live_processes_with(marker))
        assert len(family - grandchild) >= (3 if sandbox else 2)  # shim, [namespace init,] worker
        trainer.kill()  # SIGKILL: no handler, no cleanup, no atexit
        trainer.wait(timeout=10)
        if sandbox:  # the lifeline kills the shim's group, and the PID namespace takes the rest
            assert wait_until(lambda: not alive(family), 10.0), alive(family)
            # The trainer could not remove its worker's private directory; the next start does.
            from llmrl.reward.sandbox import remove_stale_private_dirs

            removed = remove_stale_private_dirs()
            assert [Path(path).name.split("-")[2] for path in removed].count(str(trainer.pid)) == 1
        else:  # the lifeline still works; a grandchild that left the session needs the namespace
            assert wait_until(lambda: not alive(family - grandchild), 10.0), alive(family - grandchild)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for pid in live_processes_with(marker):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- memory, CPU, processes


def freed_heap_bytes() -> int:
    """Free bytes in this process's malloc heap (glibc's mallinfo2), 0 where it cannot be read."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = MallInfo2
    return int(mallinfo2().fordblks)


def test_memory_hog_scores_an_error_not_an_oom(hostile: str, guarantees: dict[str, str]) -> None:
    need(guarantees, "memory_limit")
    # The worker forks from a process whose heap holds 1 GiB it freed and kept (as llmrl's
    # trainer keeps every freed byte). Unclaimed, that would serve the 768 MiB hog with no new
    # mapping, past the 256 MiB limit: the worker claims it before the limit is set.
    from llmrl.host_memory import keep_freed_memory

    kept = keep_freed_memory()
    block = bytearray(1 << 30)
    del block
    if kept:
        assert freed_heap_bytes() >= 1 << 30
    parts, metrics = score(hostile, "hog", meta={"mb": 768}, memory_limit_mb=256)
    assert parts["hog"] == 0.0 and metrics["reward/errors"] == 1.0  # MemoryError inside the worker
    parts, metrics = score(hostile, "hog", meta={"mb": 64}, memory_limit_mb=256)
    assert parts["hog"] == 64 * 1024 * 1024 and metrics["reward/failures"] == 0.0


def test_claiming_the_freed_heap_leaves_new_memory_to_the_limit() -> None:
    """In a fork with 512 MiB freed in its heap, the claim takes it without a new mapping (the
    address space does not grow), and afterwards malloc cannot serve 64 KiB without one."""
    import ctypes
    import resource

    from llmrl.host_memory import keep_freed_memory
    from llmrl.reward.freed_heap import address_space, claim_freed_heap

    if not keep_freed_memory():
        pytest.skip("glibc's keep-freed-memory settings are not in force here")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fork, like a reward worker
        os.close(reader)
        malloc = ctypes.CDLL(None).malloc
        malloc.argtypes, malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        block = bytearray(512 << 20)
        del block
        free_before, size_before = freed_heap_bytes(), address_space()
        claimed = claim_freed_heap()
        size_after = address_space()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (size_after, hard))  # no new mapping from here
        served_64k = bool(malloc(1 << 16))
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        os.write(writer, json.dumps([free_before, claimed, size_before, size_after, served_64k]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        free_before, claimed, size_before, size_after, served_64k = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert free_before >= 512 << 20
    assert claimed >= 512 << 20  # the freed block, and any other free memory in pieces of 64 KiB or more
    assert not served_64k  # what is left free is in fragments smaller than that
    # Nothing was mapped to serve the claim: only Python's own objects after it (an arena of 256 KiB)
    assert size_after - size_before < 8 << 20


def test_cpu_spin_is_stopped_by_the_cpu_limit_before_the_timeout(hostile: str, guarantees: dict[str, str]) -> None:
    need(guarantees, "cpu_limit")
    start = time.monotonic()
    parts, metrics = score(hostile, "spin", cpu_limit_s=1, timeout_s=60)
    elapsed = time.monotonic() - start
    assert parts["spin"] == 0.0 and metrics["reward/errors"] == 1.0 and metrics["reward/timeouts"] == 0.0
    assert elapsed < 15  # RLIMIT_CPU's SIGXCPU after ~1 s of CPU, not the 60 s wall timeout


def test_fork_bomb_stops_at_the_process_limit(hostile: str, guarantees: dict[str, str]) -> None:
    if os.geteuid() == 0:
        sandbox_user = "nobody"  # RLIMIT_NPROC binds only below root; the plugin is already imported
    else:
        sandbox_user = "auto"
    with RewardComputer(
        RewardConfig(functions=[f"{hostile}:fork_many"], num_workers=1, max_processes=16, sandbox_user=sandbox_user)
    ) as rewards:
        forked = rewards.score([make_trajectory(tries=200)])[0].score
        report = rewards.sandbox_guarantees
    need(report, "process_limit")
    assert 0 < forked < 16  # the worker and whatever else the user runs count too


def test_root_worker_keeps_no_capability_and_a_minimal_dev(hostile: str, guarantees: dict[str, str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the uid-0 mode exists only when the trainer runs as root")
    parts, _ = score(hostile, "capabilities", sandbox_user="same")
    assert parts["capabilities"] == 0.0
    parts, _ = score(hostile, "devices", sandbox_user="same")
    assert parts["devices"] == 10.0  # null zero full random urandom, stdin stdout stderr, fd, shm
