"""Joining a multi-process job, and leaving it promptly when the job breaks.

jax's own failure paths end a process from C++ (an abort with a stack dump, after its timeout) and
name nothing: a coordinator that never answers, or a peer that died while the others wait in a
collective. A pod job must fail fast and say why, so that its manager (queued resources, xpk,
SkyPilot) restarts it and the rerun resumes from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from typing import NoReturn

import jax

log = logging.getLogger(__name__)

EXIT_JOB_BROKEN = 4  # a multi-process job lost a process or its coordinator: rerun to resume


def join(
    *,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int,
    heartbeat_timeout_s: int,
) -> None:
    """``jax.distributed.initialize`` (auto-detected on a TPU pod when no address is given), with
    our own limit: past ``timeout_s`` the process exits naming the coordinator it waited for.

    ``heartbeat_timeout_s`` bounds how long the job waits on a process that stopped answering:
    then jax ends every other process too, instead of leaving them in a collective.
    """
    if timeout_s < 1 or heartbeat_timeout_s < 1:
        raise ValueError(
            f"distributed timeouts must be >= 1 s, got --distributed_timeout_s {timeout_s} and "
            f"--heartbeat_timeout_s {heartbeat_timeout_s}"
        )
    timer = threading.Timer(
        timeout_s, _exit_not_joined, kwargs={"address": coordinator_address, "waited_s": timeout_s}
    )
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s + 60,  # ours fires first, with a message
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    finally:
        timer.cancel()
    _label_log_lines()
    log.info(
        "joined the job: process %d of %d, pid %d on %s, %d local device(s)",
        *(jax.process_index(), jax.process_count(), os.getpid(), socket.gethostname()),
        jax.local_device_count(),
    )


def leave_broken_job(error: BaseException) -> NoReturn:
    """Exit now, naming what failed. A process of a job whose peer is gone cannot finish a
    collective, and jax's orderly shutdown would wait for the dead peer, then abort."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    log.error(
        "process %d of %d: the job is broken (%s). Another process probably died or was "
        "preempted: see its log. Exiting with code %d; rerun the job to resume from its newest "
        "checkpoint.",
        jax.process_index(),
        jax.process_count(),
        first_line,
        EXIT_JOB_BROKEN,
    )
    exit_now(EXIT_JOB_BROKEN)


def _exit_not_joined(*, address: str | None, waited_s: int) -> None:
    where = address or f"{_detected_coordinator()} (auto-detected)"
    log.error(
        "could not join the job within %d s: the coordinator at %s %s. Check that every process "
        "runs with the same --coordinator_address and --num_processes, and raise "
        "--distributed_timeout_s if hosts start slowly.",
        waited_s,
        where,
        "did not answer" if not _reachable(address) else "answered, but not every process joined",
    )
    exit_now(2)


def _reachable(address: str | None) -> bool:
    if not address:
        return False
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError, ValueError):
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    return False


def _detected_coordinator() -> str:
    """The address jax's cluster detection would use (TPU metadata, SLURM, ...), for a message."""
    try:
        from jax._src.clusters import ClusterEnv  # private: only to name it in an error

        return str(
            ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 5)[0]
        )
    except Exception:
        return "unknown"


def exit_now(code: int) -> NoReturn:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(code)


def log_format(process: str = "") -> str:
    """The CLI's log line: time, (process,) logger, message."""
    return f"%(asctime)s {process + ' ' if process else ''}%(name)s: %(message)s"


def _label_log_lines() -> None:
    """Every log line of a multi-process job says which process wrote it: ``p3/64``."""
    formatter = logging.Formatter(log_format(f"p{jax.process_index()}/{jax.process_count()}"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
