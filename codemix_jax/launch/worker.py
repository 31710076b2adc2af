"""What runs on each TPU VM worker, as shell text for `gcloud ... ssh --worker=all --command`.

The command runs detached (launch/worker_start.sh), so the ssh session and the launcher can end;
its process id, exit status and log are files in the worker's home, which `status`, `stop` and
`logs` read.
"""

from __future__ import annotations

import shlex

from codemix_jax.launch.job import LaunchSpec

WORKER_DIR = "~/codemix"  # the shipped tree and its venv
WORKER_LOG = "~/codemix.log"
WORKER_EXIT = "~/codemix.exit"  # the exit status, once the command has ended
ARCHIVE = "~/codemix.tar.gz"  # the shipped commit, on every worker
ARCHIVE_SCP = "codemix.tar.gz"  # the same, as scp names it (relative to the home)
PID = "~/codemix.pid"
RUNNING, NOT_STARTED = "running", "not started"

# Unpack the shipped commit and install it pinned (launch/worker_setup.sh), fresh each time.
SETUP = (
    f"rm -rf {WORKER_DIR} && mkdir -p {WORKER_DIR} && tar -xzf {ARCHIVE} -C {WORKER_DIR} "
    f"&& bash {WORKER_DIR}/launch/worker_setup.sh"
)

STATUS = (
    f'if [ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null; then echo {RUNNING}; '
    f'elif [ -f {WORKER_EXIT} ]; then echo "exited $(cat {WORKER_EXIT})"; '
    f"else echo {shlex.quote(NOT_STARTED)}; fi"
)

# SIGTERM: the train loop saves a checkpoint and stops, as at a preemption (preemption.py).
STOP = f'if [ -f {PID} ]; then kill -TERM "$(cat {PID})" 2>/dev/null || true; fi'


def start(spec: LaunchSpec) -> str:
    """Start the job's command in the background on this worker (launch/worker_start.sh)."""
    return f"bash {WORKER_DIR}/launch/worker_start.sh {shlex.join(spec.codemix_argv()[1:])}"


def tail(*, lines: int, follow: bool) -> str:
    return f"tail -n {lines}{' -f' if follow else ''} {WORKER_LOG}"


def parse_status(output: str) -> list[str]:
    """One status per worker (``running``, ``exited N``, ``not started``) from STATUS's output."""
    known = (RUNNING, NOT_STARTED, "exited ")
    return [line.strip() for line in output.splitlines() if line.strip().startswith(known)]
