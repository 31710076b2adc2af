"""The sandbox contains what a hostile or broken program does: each attempt below is scored as a
failure (or a timeout), what it aimed at is checked from outside to be untouched, the evaluator
keeps going, and a normal program run after them all still passes.

The hostile programs run together through run_many, two at a time, once per module: the quick
ones under roomy limits, the runaway ones (fork bomb, loops, flood) under short ones.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from codemix_jax.eval import sandbox
from codemix_jax.eval.sandbox import Limits, SandboxError, SandboxResult, run_many, run_python

QUICK = Limits(timeout_s=60.0, cpu_s=10, memory_bytes=256 << 20, max_processes=8)
RUNAWAY = Limits(timeout_s=3.0, cpu_s=1, memory_bytes=256 << 20, max_processes=8)
NORMAL = "assert sum(range(10)) == 45\nprint('ok')\n"
FORK_COUNT = (  # prints how many children it could fork
    "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
    "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
    "except OSError:\n    print(n)\n"
)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """What the programs aim at, all outside their sandbox: a process standing for the
    evaluator, TCP and Unix listeners, a secret in the real home, places to write."""
    tmp = tmp_path_factory.mktemp("sandbox_targets")
    tag = uuid.uuid4().hex
    victim = subprocess.Popen(["sleep", "300"])
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp / "listener.sock"))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0codemix-sandbox-test-{tag}")
    for listener in (tcp, unix, abstract):
        listener.listen()
        listener.setblocking(False)
    secret = Path.home() / f".codemix-sandbox-secret-{tag}"
    secret.write_text(f"secret-{tag}")
    writes = [tmp / "escaped.txt", Path.home() / f".codemix-sandbox-escape-{tag}"]
    writes += [Path(__file__).parent / f"escape-{tag}", Path(f"/usr/codemix-escape-{tag}")]
    yield {
        "victim": victim,
        "listeners": (tcp, unix, abstract),
        "tcp_port": tcp.getsockname()[1],
        "unix_path": str(tmp / "listener.sock"),
        "abstract": f"\0codemix-sandbox-test-{tag}",
        "secret": secret,
        "writes": writes,
    }
    victim.kill()
    victim.wait()
    for listener in (tcp, unix, abstract):
        listener.close()
    for path in [secret, *writes]:
        path.unlink(missing_ok=True)


def _quick_programs(t: dict) -> dict[str, str]:
    """Each exits 0 only if its attack got through."""
    writes = {
        f"write_{i}": f"open({str(p)!r}, 'w').write('escaped')" for i, p in enumerate(t["writes"])
    }
    return {
        **writes,
        "read_home": f"print(open({str(t['secret'])!r}).read())",
        "tcp_to_evaluator_host": (
            f"import socket\nsocket.create_connection(('127.0.0.1', {t['tcp_port']}), timeout=5)"
        ),
        "tcp_outbound": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)",
        "udp_outbound": (
            "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            ".sendto(b'x', ('8.8.8.8', 53))"
        ),
        "unix_socket_path": (
            f"import socket\nsocket.socket(socket.AF_UNIX).connect({t['unix_path']!r})"
        ),
        "unix_socket_abstract": (
            f"import socket\nsocket.socket(socket.AF_UNIX).connect({t['abstract']!r})"
        ),
        "kill_parent_and_evaluator": (
            "import os, signal\n"
            "for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "    for pid in (os.getppid(), 1):\n"
            "        try:\n"
            "            os.kill(pid, sig)\n"
            "        except OSError:\n"
            "            pass\n"
            f"os.kill({t['victim'].pid}, signal.SIGKILL)\n"
            f"os.kill({os.getpid()}, signal.SIGKILL)\n"
        ),
        "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "segfault": "import ctypes\nctypes.string_at(0)",
        "allocate_without_bound": "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))",
        "allocate_at_once": "bytearray(1 << 40)",
        "own_user_namespace_remounts_usr": (
            # A user namespace of its own gives it capabilities, over mounts locked read-only.
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "assert libc.unshare(0x10000000 | 0x00020000) == 0  # CLONE_NEWUSER | CLONE_NEWNS\n"
            "libc.mount(None, b'/usr', None, 0x20 | 0x1000, None)  # MS_REMOUNT | MS_BIND\n"
            "open('/usr/codemix-escape', 'w')"
        ),
        "normal_after_the_rest": NORMAL,
    }


RUNAWAY_PROGRAMS = {
    "fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    ),
    "cpu_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(10**6)",
    "output_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "normal_after_the_rest": NORMAL,
}


@pytest.fixture(scope="module")
def quick(targets) -> dict[str, SandboxResult]:
    programs = _quick_programs(targets)
    return dict(zip(programs, run_many(list(programs.values()), QUICK, workers=2), strict=True))


@pytest.fixture(scope="module")
def runaway() -> dict[str, SandboxResult]:
    programs = RUNAWAY_PROGRAMS
    return dict(zip(programs, run_many(list(programs.values()), RUNAWAY, workers=2), strict=True))


def test_a_normal_program_passes_and_a_failing_one_fails():
    ok = run_python(NORMAL, QUICK)
    assert (ok.status, ok.returncode, ok.stdout) == ("passed", 0, "ok\n")
    bad = run_python("raise ValueError('nope')", QUICK)
    assert (bad.status, bad.returncode) == ("failed", 1)
    assert "ValueError: nope" in bad.stderr
    assert run_python("raise SystemExit(3)", QUICK).returncode == 3


def test_writes_outside_its_directory_fail_and_leave_nothing(quick, targets):
    for name in (n for n in quick if n.startswith("write_")):
        assert quick[name].status == "failed", (name, quick[name])
    assert not any(path.exists() for path in targets["writes"])
    inside = run_python("open('/tmp/f', 'w').write('x')\nopen('f').read()", QUICK)
    assert inside.passed, inside.stderr


def test_the_users_home_is_hidden(quick, targets):
    result = quick["read_home"]
    assert result.status == "failed"
    assert "FileNotFoundError" in result.stderr
    assert targets["secret"].read_text() not in result.stdout


def test_no_network_local_or_outbound(quick, targets):
    for name in ("tcp_to_evaluator_host", "tcp_outbound", "udp_outbound"):
        assert quick[name].status == "failed", (name, quick[name])
        assert "Network is unreachable" in quick[name].stderr, name
    assert quick["unix_socket_path"].status == "failed"
    assert quick["unix_socket_abstract"].status == "failed"
    for listener in targets["listeners"]:
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


def test_killing_the_parent_and_the_evaluator_does_nothing(quick, targets):
    result = quick["kill_parent_and_evaluator"]
    # The init survived its signals and reported the program's own end: the evaluator's pid
    # does not exist in the sandbox.
    assert result.status == "failed"
    assert "ProcessLookupError" in result.stderr
    assert targets["victim"].poll() is None
    assert quick["kill_everything"].status == "failed"


def test_a_crashing_interpreter_is_a_failed_sample(quick):
    result = quick["segfault"]
    assert (result.status, result.returncode) == ("failed", -signal.SIGSEGV)


def test_unbounded_allocation_fails(quick):
    for name in ("allocate_without_bound", "allocate_at_once"):
        assert quick[name].status == "failed", (name, quick[name])
        assert "MemoryError" in quick[name].stderr, name


def test_its_own_user_namespace_does_not_unlock_the_mounts(quick):
    result = quick["own_user_namespace_remounts_usr"]
    assert result.status == "failed"
    assert "Read-only file system" in result.stderr, result.stderr


def test_runaway_programs_are_stopped_at_their_limits(runaway):
    for name in ("fork_bomb", "cpu_loop", "sleep_forever", "output_flood"):
        result = runaway[name]
        assert result.status == "timeout", (name, result)
        assert result.wall_s < RUNAWAY.timeout_s + 5.0, (name, result.wall_s)
    assert len(runaway["output_flood"].stdout) <= RUNAWAY.output_bytes


def test_nothing_outlives_its_sandbox(quick, runaway):
    """Every process of the fork bomb and the rest went with its namespace."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert b"/tmp/program.py" not in cmdline, cmdline


def test_the_evaluator_keeps_going(quick, runaway):
    assert quick["normal_after_the_rest"].passed
    assert runaway["normal_after_the_rest"].passed


def test_process_count_is_limited():
    result = run_python(FORK_COUNT, QUICK)
    assert result.passed, result.stderr
    assert int(result.stdout) == QUICK.max_processes - 1  # the program itself is one


def test_a_host_that_cannot_sandbox_raises_instead_of_running(monkeypatch):
    monkeypatch.setattr(sandbox, "_NAMESPACES", ("--no-such-option",))
    with pytest.raises(SandboxError, match="unshare exited"):
        run_many([NORMAL, NORMAL], QUICK)
    monkeypatch.undo()
    monkeypatch.setattr(sandbox, "_bind_paths", lambda python: ["/no/such/dir"])
    with pytest.raises(SandboxError, match="mount /tmp/no/such/dir"):
        run_python(NORMAL, QUICK)


UNPRIVILEGED = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
limits = sandbox.Limits(timeout_s=60.0, max_processes=8)
programs = json.loads(sys.argv[2])
print(json.dumps({k: sandbox.run_python(p, limits)._asdict() for k, p in programs.items()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the other tests run unprivileged already")
def test_an_unprivileged_caller_gets_a_user_namespace(targets):
    """Run as `nobody` with the system interpreter: the mode most users get, where the user
    namespace, not a uid of its own, keeps the program's process count and files apart."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    module = sandbox.__file__
    probes = [["/usr/bin/python3", "-c", f"open({module!r}).read()"], ["unshare", "-r", "true"]]
    if not shutil.which("setpriv") or any(
        subprocess.run([*as_nobody, *probe], check=False).returncode for probe in probes
    ):
        pytest.skip("no setpriv, or nobody cannot run this checkout or make a user namespace")
    programs = {
        "normal": NORMAL,
        "fork_count": FORK_COUNT,
        "shadow": "open('/etc/shadow').read()",
        "kill": f"import os\nos.kill(os.getppid(), 9)\nos.kill({targets['victim'].pid}, 9)",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)",
    }
    run = subprocess.run(
        [*as_nobody, "/usr/bin/python3", "-c", UNPRIVILEGED, module, json.dumps(programs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = json.loads(run.stdout)
    assert results["normal"]["status"] == "passed", results["normal"]
    assert results["fork_count"]["stdout"].strip() == str(8 - 1)
    assert results["shadow"]["status"] == "failed"
    assert "ProcessLookupError" in results["kill"]["stderr"]  # its parent's kill did nothing
    assert targets["victim"].poll() is None
    assert "Network is unreachable" in results["network"]["stderr"]
