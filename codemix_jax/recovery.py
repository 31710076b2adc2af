"""Resuming from the newest checkpoint that restores: a damaged one is set aside, never fatal.

A save killed mid-way leaves only orbax's ``<step>.orbax-checkpoint-tmp-*`` directory, which
orbax never counts as a step. But a step whose files were truncated or garbled afterwards (a full
disk, a bad copy) or that lost an item would fail every later resume, though older good
checkpoints sit next to it: such a step is logged in one line, set aside (renamed, never
deleted; see ``Checkpoints.set_aside``) and the next newest is tried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from jax.experimental import multihost_utils

from codemix_jax.checkpoint import CheckpointMismatchError, Checkpoints

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures of this run's settings, of the program or of the machine (a device out of memory is a
# RuntimeError), not of the files: they propagate rather than set a good checkpoint aside.
NOT_DAMAGE = (CheckpointMismatchError, RuntimeError, TypeError, AttributeError, NameError)


class NoGoodCheckpointError(ValueError):
    """Every checkpoint of the run failed to restore; each was set aside."""


def resume_newest_good(checkpoints: Checkpoints, resume: Callable[[int], T]) -> T | None:
    """``resume(step)`` for the newest step it succeeds for on every process; None if the run
    has no checkpoint.

    Raises NoGoodCheckpointError, naming each step tried and why it failed, if none succeeds: a
    run that had checkpoints must never silently start afresh.
    """
    failures = []
    while (step := checkpoints.latest_step()) is not None:
        result, reason = restore_together(lambda: resume(step))
        if reason is None:
            return result
        where = checkpoints.set_aside(step)
        log.warning("checkpoint at step %d is damaged (%s): moved to %s", step, reason, where)
        failures.append(f"step {step}: {reason}")
    if failures:
        raise NoGoodCheckpointError(
            f"no checkpoint of this run restores ({'; '.join(failures)}); each was moved to "
            f"{checkpoints.damaged_directory}"
        )
    return None


def restore_together(restore: Callable[[], T]) -> tuple[T | None, str | None]:
    """``restore()``, a collective restore, on every process: its result and None, or None and
    why some process met damaged files (every process gets the same answer, see ``agree``)."""
    try:
        result, error = restore(), None
    except Exception as caught:
        result, error = None, caught
    return result, agree(error)


class FailedElsewhereError(ValueError):
    """A collective restore failed on another process for a reason other than damaged files."""


OK, DAMAGED, FAILED = 0, 1, 2  # a process's outcome of a collective restore


def agree(error: Exception | None) -> str | None:
    """Why a collective restore met damaged files on some process, or None if it succeeded on
    every one. Every process calls this after the restore, with what it raised, if anything.

    A shard may be damaged on one host only, and every process must take the same decision.
    Re-raises ``error`` if it is not damage (see ``damage``); raises FailedElsewhereError if
    another process's was not.
    """
    reason = None if error is None else damage(error)
    outcome = OK if error is None else DAMAGED if reason else FAILED
    outcomes = multihost_utils.process_allgather(np.int32(outcome))
    if outcome == FAILED:
        raise error
    if (failed := np.flatnonzero(outcomes == FAILED)).size:
        raise FailedElsewhereError(
            f"the restore failed on process {failed.tolist()}, not for damaged files: see its log"
        )
    if reason is None and (damaged := np.flatnonzero(outcomes == DAMAGED)).size:
        reason = f"failed to restore on process {damaged.tolist()}"
    return reason


def damage(error: Exception) -> str | None:
    """Why a failed restore means damaged files (its root cause's first line, TensorStore's names
    the file); None if ``error`` is not about the files (see NOT_DAMAGE)."""
    if isinstance(error, NOT_DAMAGE):
        return None
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = str(cause).splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0]}"
