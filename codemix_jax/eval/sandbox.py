"""Run untrusted Python programs (model-written code) in a throw-away Linux sandbox.

Each program gets its own process tree in fresh pid, network, mount, IPC and UTS namespaces
(`unshare`; a user namespace too when the caller is not root). Inside, this same file runs as
the namespace's init (stdlib only): it builds a new root of read-only bind mounts (the system
directories and the interpreter's prefix, nothing else: no home, no /tmp, no /proc, no sockets of
the host), a small writable tmpfs as /tmp and the working directory, pivots into it, and runs the
program as its child with CPU, memory, file-size and process-count limits, no capabilities and
no way to gain any. The caller kills the whole namespace at the wall-clock limit: the init's death
takes every process in it along. The net namespace has only a loopback interface, down.

RLIMIT_NPROC is what stops a fork bomb. The kernel never applies it to root, so when the caller is
root the program runs as a uid of its own (`_UID_BASE` + the init's host pid); otherwise the
user namespace gives each sandbox its own count. Needs Linux >= 5.12 (mount_setattr), util-linux
`unshare`, and for a non-root caller unprivileged user namespaces: where they are refused,
`run_python` raises `SandboxError` rather than running anything unsandboxed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

# Each kept as is inside the sandbox, read-only: what a stdlib-only interpreter needs to start.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_NAMESPACES = ("--pid", "--net", "--mount", "--ipc", "--uts", "--fork", "--kill-child")
_UID_BASE = 2_000_000_000  # + a host pid (< 2**22): a uid no account or other sandbox has
_PROGRAM = "/tmp/program.py"
_SAMPLE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
_DRAIN_S = 5.0  # after the kill, how long the pipes may take to close

# Linux constants (uapi headers); the same on x86_64 and aarch64 unless a table says otherwise.
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 0x2, 0x4, 0x1000, 0x4000
_MNT_DETACH, _AT_FDCWD, _AT_RECURSIVE = 0x2, -100, 0x8000
_ATTR_RDONLY, _ATTR_NOSUID, _ATTR_NODEV = 0x1, 0x2, 0x4
_SYS_MOUNT_SETATTR = 442
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38


class Limits(NamedTuple):
    """What one program may use. Memory and CPU are per process; processes count threads too."""

    timeout_s: float = 10.0  # wall clock for the whole sandbox, start-up included
    cpu_s: int = 5
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    max_processes: int = 16  # the program's processes and threads at once, itself included
    file_bytes: int = 16 << 20  # largest file, and the size of the writable /tmp
    output_bytes: int = 8 << 10  # the tail of stdout and of stderr kept


DEFAULT_LIMITS = Limits()


class SandboxResult(NamedTuple):
    """How one program ended. status: 'passed' (exit 0), 'failed', or 'timeout' (wall or CPU)."""

    status: str
    returncode: int | None  # negative: killed by that signal; None: killed at the wall limit
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class SandboxError(RuntimeError):
    """The sandbox could not be built on this host, so nothing was run."""


def run_python(program: str, limits: Limits = DEFAULT_LIMITS) -> SandboxResult:
    """Runs `program` with a stdlib-only interpreter in a fresh sandbox; never raises for
    anything the program does. Raises SandboxError when the sandbox itself cannot be built."""
    status_read, status_write = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            _command(status_write, limits),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_write,),
            start_new_session=True,  # one process group to kill: unshare and the init
            cwd="/",
            env={},
        )
    finally:
        os.close(status_write)
    with proc:
        _send(proc, program.encode())
        out, err, status, timed_out = _collect(proc, status_read, start + limits.timeout_s, limits)
    return _result(status, proc.returncode, out, err, timed_out, time.monotonic() - start)


def run_many(
    programs: Sequence[str],
    limits: Limits = DEFAULT_LIMITS,
    *,
    workers: int = 2,
    on_done: Callable[[int, SandboxResult], None] | None = None,
) -> list[SandboxResult]:
    """Runs each program in its own sandbox, `workers` at a time; results in input order.
    `on_done(index, result)` is called as each finishes (progress reports)."""
    # Imported here, not at the top: the sandbox's init runs this file and needs no pool.
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results: list[SandboxResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_python, p, limits): i for i, p in enumerate(programs)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                if on_done is not None:
                    on_done(index, results[index])
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results  # type: ignore[return-value]  # every slot is filled


def _command(status_fd: int, limits: Limits) -> list[str]:
    """`unshare ... python -I -S sandbox.py CONFIG`: this file, run as the namespace's init."""
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        raise SandboxError("util-linux `unshare` not found: cannot sandbox generated code")
    if os.uname().machine not in _SYS_PIVOT_ROOT:
        raise SandboxError(f"no pivot_root syscall number known for {os.uname().machine}")
    as_root = os.geteuid() == 0
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    config = {
        "status_fd": status_fd,
        "python": python,
        "binds": _bind_paths(python),
        "uid_base": _UID_BASE if as_root else None,
        "limits": limits._asdict(),
    }
    user_ns = [] if as_root else ["--user", "--map-root-user"]
    script = os.path.realpath(__file__)
    return [unshare, *_NAMESPACES, *user_ns, python, "-I", "-S", script, json.dumps(config)]


def _bind_paths(python: str) -> list[str]:
    """The system directories and the interpreter's prefix, outermost only."""
    prefixes = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(python)}
    paths = [p for p in _SYSTEM_PATHS if os.path.lexists(p)]
    paths = list(dict.fromkeys(paths + sorted(os.path.realpath(p) for p in prefixes)))
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths)]


def _send(proc: subprocess.Popen, program: bytes) -> None:
    """The init reads the program from stdin before anything else; a failed start closes it."""
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(program)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]


def _collect(
    proc: subprocess.Popen, status_fd: int, deadline: float, limits: Limits
) -> tuple[bytes, bytes, bytes, bool]:
    """Reads stdout, stderr and the init's status pipe until all close, keeping the tail of
    each; at the deadline kills the process group (the init's death ends the namespace)."""
    fds = [proc.stdout.fileno(), proc.stderr.fileno(), status_fd]  # type: ignore[union-attr]
    tails = dict.fromkeys(fds, b"")
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:
                    break  # a pipe still open after the kill: leave it
                _kill(proc)
                timed_out, deadline = True, time.monotonic() + _DRAIN_S
            for key, _ in selector.select(max(remaining, 0.0)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                tails[key.fd] = (tails[key.fd] + chunk)[-limits.output_bytes :]
    os.close(status_fd)
    try:
        proc.wait(timeout=_DRAIN_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()
    return tails[fds[0]], tails[fds[1]], tails[fds[2]], timed_out


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _result(
    status: bytes, unshare_rc: int, out: bytes, err: bytes, timed_out: bool, wall_s: float
) -> SandboxResult:
    """Reads the init's status lines: 'ready' once built, then 'exit N'; or 'error ...'."""
    lines = status.decode(errors="replace").splitlines()
    stderr = err.decode(errors="replace")
    errors = [line[len("error ") :] for line in lines if line.startswith("error ")]
    if errors or not (timed_out or "ready" in lines):
        reason = "; ".join(errors) or f"unshare exited {unshare_rc}: {stderr.strip()[-500:]}"
        raise SandboxError(f"could not build the sandbox: {reason}")
    exits = [int(line.split()[1]) for line in lines if line.startswith("exit ")]
    if exits:  # the program ended on its own, if only just before the kill
        returncode = exits[0]
        outcome = {0: "passed", -signal.SIGXCPU: "timeout"}.get(returncode, "failed")
    else:  # killed at the wall limit, or the init died (its exit code, then)
        returncode = None if timed_out else unshare_rc
        outcome = "timeout" if timed_out else "failed"
    return SandboxResult(outcome, returncode, out.decode(errors="replace"), stderr, wall_s)


# ---- Inside the namespaces: this file run as the init, `python -I -S sandbox.py CONFIG` ----


def _init(config: dict) -> None:
    """Pid 1 of the sandbox: builds the root, runs the program as its child and reports how it
    ended on the status pipe. Exiting ends the namespace, killing anything the program left."""
    status = os.fdopen(config["status_fd"], "w", buffering=1)
    os.set_inheritable(status.fileno(), False)  # closed when the program is exec'd
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an init ignores signals it has no handler for
    # A backstop to the caller's kill, should the caller die first: exiting ends the namespace.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.alarm(int(config["limits"]["timeout_s"]) + 2)
    try:
        uid = None if config["uid_base"] is None else config["uid_base"] + _host_pid()
        _build_root(config, sys.stdin.buffer.read(), uid)
    except OSError as err:
        status.write(f"error {err}\n")
        return
    status.write("ready\n")
    child = os.fork()
    if child == 0:
        _exec_program(config, uid, status)
    while True:  # as init, reap every orphan until the program itself ends
        pid, wait_status = os.wait()
        if pid == child:
            status.write(f"exit {os.waitstatus_to_exitcode(wait_status)}\n")
            return


def _host_pid() -> int:
    """Our pid outside the namespace: /proc is still the host's until the pivot."""
    return int(os.readlink("/proc/self"))


def _build_root(config: dict, program: bytes, uid: int | None) -> None:
    """A tmpfs root (mounted over /tmp of this private mount namespace) holding read-only binds
    of the system and the interpreter, a few device nodes and a writable tmpfs /tmp with the
    program; then pivot_root into it and detach the host's tree."""
    root, limits = "/tmp", config["limits"]
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    for path in config["binds"]:
        _bind(path, root + path, _ATTR_RDONLY | _ATTR_NOSUID | _ATTR_NODEV)
    for device in _DEVICES:
        _bind(device, root + device, _ATTR_RDONLY | _ATTR_NOSUID)
    owner = 0 if uid is None else uid
    os.mkdir(root + "/tmp")
    size = f"size={limits['file_bytes']},mode=0700,uid={owner},gid={owner}"
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, size)
    with open(root + _PROGRAM, "wb") as f:
        f.write(program)
    _set_mount_attr(root, _ATTR_RDONLY, recursive=False)
    os.chdir(root)
    _syscall(_SYS_PIVOT_ROOT[os.uname().machine], b".", b".")
    _check(_libc().umount2(b".", _MNT_DETACH), "umount2 old root")
    os.chdir("/tmp")


def _bind(source: str, target: str, attrs: int) -> None:
    """Bind `source` (with its submounts) read-only at `target`; a symlink is copied as is."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.mkdir(target)
    else:
        open(target, "x").close()
    _mount(source, target, None, _MS_BIND | _MS_REC, None)
    _set_mount_attr(target, attrs, recursive=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    args = [None if arg is None else arg.encode() for arg in (source, target, fstype, data)]
    _check(_libc().mount(*args[:3], flags, args[3]), f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns_fd")]


def _set_mount_attr(path: str, attrs: int, *, recursive: bool) -> None:
    """mount_setattr: unlike a remount it reaches every submount, and a user namespace may
    always make a mount more restrictive."""
    attr = _MountAttr(attrs, 0, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    args = (_AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
    _syscall(_SYS_MOUNT_SETATTR, *args)


def _syscall(number: int, *args: object) -> None:
    _check(_libc().syscall(number, *args), f"syscall {number}")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _exec_program(config: dict, uid: int | None, status) -> None:
    """In the init's child: limits, no capabilities (the bounding set emptied, no new
    privileges), the sample's own uid when the caller is root, stdin from /dev/null; then exec."""
    try:
        limits = config["limits"]
        cpu_s = limits["cpu_s"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
        # In a user namespace the count takes in `unshare` and this init as well.
        nproc = limits["max_processes"] + (2 if uid is None else 0)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for cap in range(64):  # EINVAL past the last capability this kernel has
            _libc().prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        python = config["python"]
        os.execve(python, [python, "-I", "-S", _PROGRAM], _SAMPLE_ENV)
    except OSError as err:
        status.write(f"error {err}\n")
    os._exit(127)


if __name__ == "__main__":
    _init(json.loads(sys.argv[1]))
