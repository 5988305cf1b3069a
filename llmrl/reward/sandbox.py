"""The reward sandbox: operating-system walls around a reward worker process (Linux).

A reward function is user code run on every sample, with the gold answer in its arguments. The
worker that runs it is confined by the kernel, not by Python checks:

- its own session and process group, so the trainer's group is not its group and a kill of the
  group also reaches whatever the reward forked;
- a lifeline pipe: the shim that starts the worker blocks on the read end of a pipe whose write
  end only the trainer holds. When the trainer dies for any reason (kill -9 included) the pipe
  reads end-of-file and the shim kills its whole group. A parent-death signal is used only
  between the sandbox's own single-threaded processes: Linux sends it when the parent *thread*
  exits, and the trainer may start workers from a thread that ends long before the run does;
- new mount, network and PID namespaces (as root directly; otherwise through a user namespace,
  where the kernel lets unprivileged users create one): every mount read-only except a private
  per-worker directory, only a loopback device that is down, and a PID namespace whose init is
  the sandbox's own reaper, so when it dies the kernel kills every process in it, including one
  that started its own session to escape the group kill;
- as root, the worker then drops to the unprivileged uid/gid 65534 (nobody) when the Python
  installation and the plugins are readable by other users; otherwise (Python under a 0700
  /root, say) it stays uid 0 but drops every capability, so it can read what root owns but can
  neither remount, reconfigure the network, nor open a device beyond a minimal /dev (null, zero,
  full, random, urandom). The PID namespace already hides the trainer from kill(2). Either
  way no_new_privs is set;
- rlimits: address space (what the worker may map beyond its size at start, after it has claimed
  the heap memory the trainer freed, so that the reward cannot reuse it unseen), CPU seconds per
  call, file size, process count (per user: meaningful only after the uid drop, root is exempt)
  and no core files;
- cwd, HOME and TMPDIR point at the private directory, which the pool removes at close.

`enter` runs in the multiprocessing child and returns only in the process that runs the reward
calls, with a report of which of these guarantees are in force (the rest degrade, never fail).
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import select
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass

from llmrl.reward import freed_heap

NOBODY = 65534

# <sched.h> and <sys/mount.h>; the values are the same on every Linux architecture.
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# The character devices a confined worker keeps (major, minor): what Python and common libraries open.
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}

# Per-mount options (mountinfo field 6) that a bind remount must repeat: in a user namespace the
# kernel refuses a remount that would clear one of them (they are locked by the outer namespace).
_MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}

GUARANTEES = (
    "process_group", "trainer_death", "private_dir", "read_only_fs", "no_network",
    "pid_namespace", "unprivileged_uid", "memory_limit", "cpu_limit", "file_size_limit", "process_limit",
)


@dataclass(frozen=True)
class SandboxSettings:
    """The recipe's sandbox knobs, in the form a worker needs them."""

    memory_limit_mb: int | None = 4096
    cpu_limit_s: float | None = 10.0
    max_processes: int | None = 256
    max_file_mb: int | None = 256
    user: str = "auto"  # "nobody", "same" (the trainer's uid, capabilities dropped) or "auto"


def choose_user(requested: str, paths: list[str]) -> tuple[str, str]:
    """Resolve `auto` in the trainer: nobody when every path the worker may import from is
    readable by other users, else the trainer's own uid. Returns (user, why)."""
    if requested != "auto":
        return requested, f"reward.sandbox_user: {requested}"
    for path in paths:
        blocked = _blocked_for_others(path)
        if blocked:
            return "same", f"{blocked} is not readable by other users, so uid nobody could not import from it"
    return "nobody", "auto"


def _blocked_for_others(path: str) -> str | None:
    """The first directory on the way to `path` that other users cannot enter, or `path` itself
    if they cannot read it (a directory on sys.path is listed by the import system: r and x)."""
    target = os.path.realpath(path)
    if not os.path.exists(target):
        return None
    chain = [target]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    for item in reversed(chain):
        if item == target:
            needed = 0o005 if os.path.isdir(item) else 0o004
        else:
            needed = 0o001
        if os.stat(item).st_mode & needed != needed:
            return item
    return None


class _Libc:
    """The few libc calls Python 3.11 lacks (os.unshare arrived in 3.12), with errno."""

    def __init__(self) -> None:
        # The symbols of the running process, libc's among them (find_library would run ldconfig).
        self._lib = ctypes.CDLL(None, use_errno=True)
        self._lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self._lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def unshare(self, flags: int) -> None:
        self._check(self._lib.unshare(flags), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        encode = lambda text: None if text is None else os.fsencode(text)  # noqa: E731
        self._check(
            self._lib.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}"
        )

    def drop_capabilities(self) -> None:
        """Empty the bounding, ambient, permitted, effective and inheritable sets."""
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last = int(handle.read())
        for capability in range(last + 1):
            self._lib.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
        self._lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
        self._check(self._lib.capset(header, data), "capset")

    def prctl(self, option: int, value: int) -> None:
        self._check(self._lib.prctl(option, value, 0, 0, 0), "prctl")


def available() -> str | None:
    """None where the sandbox can run, else why not."""
    if not sys.platform.startswith("linux"):
        return f"the reward sandbox needs Linux (this is {sys.platform})"
    return None


_PRIVATE_DIR_PREFIX = "llmrl-reward-"


def make_private_dir() -> str:
    """The directory a worker may write to; created by the trainer, which removes it at close.
    Its name carries the trainer's pid, so a later run can tell a crashed run's leftover."""
    # real path: it is compared with the mount table
    return os.path.realpath(tempfile.mkdtemp(prefix=f"{_PRIVATE_DIR_PREFIX}{os.getpid()}-"))


def remove_stale_private_dirs() -> list[str]:
    """Remove the private directories of trainers that are gone (killed before they could
    clean up: `kill -9`, a power cut); return what was removed."""
    removed = []
    parent = tempfile.gettempdir()
    for name in os.listdir(parent):
        owner = name[len(_PRIVATE_DIR_PREFIX):].partition("-")[0]
        if not name.startswith(_PRIVATE_DIR_PREFIX) or not owner.isdigit() or _process_exists(int(owner)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(os.path.join(parent, name))
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def enter(
    settings: SandboxSettings | None,
    private_dir: str | None,
    lifeline: tuple[int, int],
    keep_fd: int,
    user_reason: str = "",
) -> dict[str, str]:
    """Set up this freshly forked worker; return, in the process that will run reward calls, a
    report mapping each guarantee to "on" or to why it is missing (empty with settings None:
    the sandbox is off, and only the session, the lifeline and the signal reset apply).

    Process tree: this process (the shim: session leader, watches the lifeline) -> with a PID
    namespace, its init (reaps orphans) -> the worker. Only the worker returns from here. Of the
    trainer's file descriptors the worker keeps `keep_fd` (its pipe) and 0-2 only: any other
    could reach a file through the trainer's writable mounts, read-only view or not.
    """
    report = {name: "off" for name in GUARANTEES}
    lifeline_fd, lifeline_write_fd = lifeline
    os.close(lifeline_write_fd)  # only the trainer may hold it, or the pipe never reads EOF
    reset_signals()
    os.setsid()
    report["process_group"] = "on"
    namespaces = 0
    if settings is not None and private_dir:
        namespaces = _enter_namespaces(private_dir, settings.max_file_mb, report)
    pid_namespace = bool(namespaces & CLONE_NEWPID)
    worker = os.fork()
    if worker:
        _shim(worker, lifeline_fd, pid_namespace)  # never returns
    _close_inherited_fds(keep_fd)
    _die_with_parent()
    if pid_namespace:
        _become_init()  # returns in a new child: the worker
        report["pid_namespace"] = "on"
    report["trainer_death"] = "on"
    if settings is None or not private_dir:
        return {}
    _unmap_shared_writable_memory()
    _confine_worker(settings, private_dir, report, user_reason, in_user_namespace=bool(namespaces & CLONE_NEWUSER))
    return report


def limit_call_cpu(seconds: float | None) -> None:
    """Give the next call `seconds` of CPU on top of what the worker has used (RLIMIT_CPU is a
    per-process total, so a per-call limit is the total so far plus the allowance)."""
    if seconds is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    except (ValueError, OSError):
        pass


def describe_death(exitcode: int | None) -> str:
    """Why a sandboxed worker died, in words, from its exit code."""
    if exitcode == -signal.SIGXCPU:
        return "exceeded its CPU time limit (reward.cpu_limit_s); worker killed"
    if exitcode == -signal.SIGXFSZ:
        return "wrote a file larger than reward.max_file_mb; worker killed"
    return f"worker process died (exit code {exitcode})"


# ---------------------------------------------------------------- the steps


def reset_signals() -> None:
    # A forked worker inherits the trainer's Python handlers (its SIGTERM checkpoint-and-stop
    # handler among them); they make no sense here. Ctrl-C stays the trainer's to handle.
    signal.set_wakeup_fd(-1)
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if callable(signal.getsignal(number)):
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _enter_namespaces(private_dir: str, size_mb: int | None, report: dict[str, str]) -> int:
    libc = _Libc()
    wanted = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    uid, gid = os.getuid(), os.getgid()
    try:
        if os.geteuid() != 0:
            raise PermissionError(1, "not root")
        libc.unshare(wanted)
    except OSError:
        # A user namespace gives an unprivileged user (or a root without CAP_SYS_ADMIN, as in a
        # default Docker container) the capabilities the other namespaces need, inside it only;
        # the user is mapped to itself so files keep their owner.
        try:
            libc.unshare(CLONE_NEWUSER | wanted)
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
            wanted |= CLONE_NEWUSER
        except OSError as exc:
            reason = f"no namespaces ({exc.strerror}; needs root or unprivileged user namespaces)"
            for name in ("read_only_fs", "no_network", "pid_namespace"):
                report[name] = reason
            return 0
    report["no_network"] = "on"  # a new network namespace holds only a loopback device, down
    try:
        if not wanted & CLONE_NEWUSER:  # mknod needs real root; a user namespace cannot
            _minimal_dev(libc)
        _read_only_except(libc, private_dir, size_mb)
        report["read_only_fs"] = "on"
    except OSError as exc:
        report["read_only_fs"] = f"remount failed: {exc}"
    return wanted


def _minimal_dev(libc: _Libc) -> None:
    """Cover /dev with a tmpfs holding only harmless devices: a worker that keeps uid 0 could
    otherwise write a disk through its device node (device writes ignore a read-only mount)."""
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    libc.mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, (major, minor) in _DEVICES.items():
        os.mknod(f"/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    for index, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{index}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")
    os.mkdir("/dev/shm", 0o1777)


def _read_only_except(libc: _Libc, private_dir: str, size_mb: int | None) -> None:
    # Private propagation first: nothing done in this namespace may leak to the trainer's mounts.
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    # The writable place is a tmpfs of bounded size over the private directory: many files
    # within RLIMIT_FSIZE each cannot fill the trainer's disk either.
    size = f"size={size_mb}m," if size_mb is not None else ""
    libc.mount("tmpfs", private_dir, "tmpfs", MS_NOSUID | MS_NODEV, f"{size}mode=700")
    for mount_point, options in _mounts():
        if mount_point == private_dir:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
        try:
            libc.mount(None, mount_point, None, flags)
        except OSError:
            if mount_point == "/":
                raise
            # A mount hidden under another (or vanished) cannot be remounted; what is reachable is.


def _mounts() -> list[tuple[str, list[str]]]:
    found = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            # octal escapes (\040 for a space) in mount points
            point = fields[4].encode().decode("unicode_escape")
            found.append((point, fields[5].split(",")))
    return found


def _close_inherited_fds(keep_fd: int) -> None:
    # Python's own descriptors for stdin/out/err stay (a reward may print); stdin reads nothing.
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except OSError:
        pass


def _unmap_shared_writable_memory() -> None:
    """A fork keeps the trainer's shared writable mappings (shared-memory tensors, `mmap` buffers):
    writes to them land in the trainer. The worker never needs them: unmap every one. Without a
    descriptor (all closed) and with /dev/shm out of reach, a reward cannot map them again."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for fields in regions:
        permissions = fields[1]
        if "w" in permissions and permissions.endswith("s"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            libc.munmap(start, end - start)


def _shim(child: int, lifeline_fd: int, child_is_init: bool) -> None:
    """Wait for the child; if the trainer dies first (the lifeline reads EOF), kill the group."""
    code = 1
    try:
        try:
            watched = [lifeline_fd, os.pidfd_open(child)]
            poll_s = None
        except (AttributeError, OSError):  # kernels before 5.3: poll the child instead
            watched, poll_s = [lifeline_fd], 0.2
        while True:
            ready, _, _ = select.select(watched, [], [], poll_s)
            if lifeline_fd in ready and not os.read(lifeline_fd, 1):
                os.killpg(0, signal.SIGKILL)  # the trainer is gone: the worker, its init, us
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid == child:
                code = _exit_code(status, child_is_init)
                break
    finally:
        _exit_like(code)


def _become_init() -> None:
    """In a new PID namespace the first child is its init: it reaps orphans, and when it dies the
    kernel kills everything left in the namespace. Returns only in the worker it forks."""
    _mount_own_proc()
    worker = os.fork()
    if worker == 0:
        return  # the worker: PID 2 of the namespace
    code = 1
    try:
        while True:
            pid, status = os.wait()
            if pid == worker:
                code = _exit_code(status)
                break
    finally:
        # The init of a PID namespace ignores signals it has no handler for, even its own, so it
        # passes a signal death on as 128 + signal; the shim turns it back into a signal.
        os._exit(code if code >= 0 else 128 - code)


def _mount_own_proc() -> None:
    # /proc of this namespace, read-only: the trainer's processes are not even listed.
    try:
        _Libc().mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except OSError:
        pass


def _confine_worker(
    settings: SandboxSettings, private_dir: str, report: dict[str, str], user_reason: str, in_user_namespace: bool
) -> None:
    os.chdir(private_dir)
    for variable in ("HOME", "TMPDIR", "TMP", "TEMP"):
        os.environ[variable] = private_dir
    tempfile.tempdir = None  # forget the trainer's cached choice
    report["private_dir"] = "on"
    _set_limits(settings, report)
    libc = _Libc()
    if in_user_namespace:
        # Only the trainer's own uid exists in it; the PID namespace hides the trainer. The
        # capabilities the namespace granted would let the reward remount the filesystem
        # read-write again: they go.
        libc.drop_capabilities()
        report["unprivileged_uid"] = "user namespace: the trainer's own uid, no capabilities"
    elif os.geteuid() == 0 and settings.user == "nobody":
        os.chown(private_dir, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        report["unprivileged_uid"] = "on"
    elif os.geteuid() == 0:
        libc.drop_capabilities()
        report["unprivileged_uid"] = f"uid 0 without capabilities ({user_reason})"
    else:
        report["unprivileged_uid"] = "not root: runs as the trainer's own user (the PID namespace, if on, hides the trainer)"
    try:
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError:
        pass
    if report["process_limit"] == "on" and os.geteuid() == 0:
        report["process_limit"] = "not enforced: the kernel exempts uid 0 from RLIMIT_NPROC"
    elif report["process_limit"] == "on" and report["unprivileged_uid"] != "on":
        report["process_limit"] = "counted against the trainer's user, shared with its processes"


def _set_limits(settings: SandboxSettings, report: dict[str, str]) -> None:
    mib = 1024 * 1024
    limits = {"file_size_limit": None, "process_limit": None, "memory_limit": None}
    if settings.memory_limit_mb is not None:
        # A fork starts as big as the trainer (torch alone maps gigabytes of address space), so
        # the limit is on what the reward may add; the trainer's freed heap is claimed first, or
        # the reward could reuse it unseen by the limit.
        freed_heap.claim_freed_heap()
        limits["memory_limit"] = (resource.RLIMIT_AS, freed_heap.address_space() + settings.memory_limit_mb * mib)
    if settings.max_file_mb is not None:
        limits["file_size_limit"] = (resource.RLIMIT_FSIZE, settings.max_file_mb * mib)
    if settings.max_processes is not None:
        limits["process_limit"] = (resource.RLIMIT_NPROC, settings.max_processes)
    for name, limit in limits.items():
        if limit is None:
            report[name] = "off in the recipe"
            continue
        try:
            resource.setrlimit(limit[0], (limit[1], limit[1]))
            report[name] = "on"
        except (ValueError, OSError) as exc:
            report[name] = f"setrlimit failed: {exc}"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    report["cpu_limit"] = "on (per call)" if settings.cpu_limit_s is not None else "off in the recipe"


def _die_with_parent() -> None:
    # Between the sandbox's own single-threaded processes the parent-death signal is exact.
    parent = os.getppid()
    try:
        _Libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def _exit_code(status: int, from_init: bool = False) -> int:
    """waitpid status -> multiprocessing's convention: the exit code, or -signal (an init's
    128 + signal decoded)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    code = os.WEXITSTATUS(status)
    return -(code - 128) if from_init and 128 < code < 128 + signal.NSIG else code


def _exit_like(code: int) -> None:
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 1)


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
