"""Where a run's state starts: its own newest checkpoint, another run's checkpoint, or fresh.

A training stage (continued pre-training, cooldown, instruction tuning) starts from another run's
checkpoint, named by ``InitFrom``: its params only (a fresh optimizer), or its params and optimizer
state. Either way the stage starts at step 0 and reads its own mixture from its own position 0,
and every checkpoint it writes records where it came from (``meta["init_from"]``). Once the stage
has a checkpoint of its own it resumes from that and never re-initialises, so a stage interrupted
after its first save goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import gin

from codemix_jax.checkpoint import (
    CheckpointMismatchError,
    Checkpoints,
    SavedRun,
    checkpoint_dir,
    differences,
)
from codemix_jax.data.mixture import HostBatches
from codemix_jax.recovery import restore_together, resume_newest_good
from codemix_jax.train_state import TrainProgram, TrainState, init_train_state, stage_start_state

log = logging.getLogger(__name__)

INIT_KEY = "init_from"  # the meta section recording the init source ({} for a fresh start)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class InitFrom:
    """Start a run from another run's checkpoint (gin: ``train.init_from = @InitFrom()``).

    Attributes:
      run_dir: the other run's run dir; its checkpoints are in ``run_dir/checkpoints``. Its model
        dimensions must be this run's; its mixture, data position and seeds need not be.
      step: the checkpoint to take; None takes that run's newest.
      with_optimizer: also take its optimizer state (moments and Adam's count; the LR schedule
        still starts at this run's step 0); else the optimizer starts fresh.
    """

    run_dir: str
    step: int | None = None
    with_optimizer: bool = False

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("InitFrom.run_dir is empty: name the run dir to initialise from")
        if self.step is not None and self.step < 1:
            raise ValueError(f"InitFrom.step must be >= 1 (or None: the newest), got {self.step}")

    def request(self) -> dict:
        """What a resumed run must have been initialised with: the source, its step if pinned,
        and whether the optimizer state came along."""
        pinned = {} if self.step is None else {"step": self.step}
        return {
            "run_dir": os.path.abspath(self.run_dir),
            "with_optimizer": self.with_optimizer,
            **pinned,
        }


def start_state(
    *,
    checkpoints: Checkpoints,
    program: TrainProgram,
    batches: HostBatches,
    meta: dict,
    seed: int,
    init_from: InitFrom | None,
) -> tuple[TrainState, int, dict]:
    """The state to train from, its step, and ``meta`` with the init record, to save with it.

    Resumes the run's newest checkpoint that restores if it has one (damaged ones are set aside,
    see ``recovery``), else starts from ``init_from`` at step 0, else fresh from ``seed``.
    """
    resume = functools.partial(
        _resume,
        checkpoints=checkpoints,
        program=program,
        batches=batches,
        meta=meta,
        init_from=init_from,
    )
    if resumed := resume_newest_good(checkpoints, resume):
        return resumed
    if init_from is not None:
        record, state = _init_from(init_from, program=program, model=meta["ModelConfig"])
        return state, 0, {**meta, INIT_KEY: record}
    state = init_train_state(
        model=program.model, tx=program.tx, shardings=program.shardings, seed=seed
    )
    return state, 0, {**meta, INIT_KEY: {}}


def _resume(
    step: int,
    *,
    checkpoints: Checkpoints,
    program: TrainProgram,
    batches: HostBatches,
    meta: dict,
    init_from: InitFrom | None,
) -> tuple[TrainState, int, dict]:
    """The run's own checkpoint at ``step``; refused if it was initialised otherwise than
    ``init_from`` says."""
    meta = {**meta, INIT_KEY: _check_resume(checkpoints.meta(step), init_from, step)}
    state = checkpoints.restore(
        step, abstract_state=program.abstract_state, batches=batches, meta=meta
    )
    log.info("resuming from the checkpoint at step %d", step)
    return state, step, meta


def _init_from(
    init_from: InitFrom, *, program: TrainProgram, model: dict
) -> tuple[dict, TrainState]:
    """The other run's params (and optimizer state) at step 0, resharded onto this run's mesh."""
    source = SavedRun(checkpoint_dir(init_from.run_dir))
    step = _source_step(source, init_from)
    saved = source.meta(step)
    if found := differences(saved, {"ModelConfig": model}):
        raise CheckpointMismatchError(
            f"cannot initialise from {source.directory} step {step}: it holds another model "
            f"({', '.join(found)})"
        )
    taken = "params and optimizer state" if init_from.with_optimizer else "params only"
    log.info("initialising from %s step %d (%s)", source.directory, step, taken)
    abstract = program.abstract_state
    parts = {"params": abstract.params}
    if init_from.with_optimizer:
        parts["opt_state"] = abstract.opt_state
    restored, reason = restore_together(lambda: source.restore_state(step, parts))
    if reason:
        raise DamagedSourceError(source.directory, step, reason) from None
    state = stage_start_state(
        params=restored["params"],
        opt_state=restored.get("opt_state"),
        tx=program.tx,
        shardings=program.shardings,
    )
    record = {**init_from.request(), "step": step, "config_hash": _config_hash(saved)}
    return record, state


class DamagedSourceError(ValueError):
    """The checkpoint a stage starts from does not restore: its files are damaged."""

    def __init__(self, directory: str, step: int, reason: str):
        super().__init__(
            f"cannot initialise from {directory} step {step}: it does not restore ({reason}). "
            "Move that step aside and rerun: its stage resumes from the checkpoint before it"
        )
        self.directory = directory  # the source's checkpoints
        self.step = step
        self.reason = reason


def _source_step(source: SavedRun, init_from: InitFrom) -> int:
    steps = source.steps()
    if not steps:
        raise FileNotFoundError(
            f"InitFrom.run_dir {init_from.run_dir!r} has no checkpoint (looked in "
            f"{source.directory})"
        )
    if init_from.step is None:
        return max(steps)
    if init_from.step not in steps:
        raise FileNotFoundError(
            f"InitFrom.run_dir {init_from.run_dir!r} has no checkpoint at step {init_from.step} "
            f"(it has steps {sorted(steps)})"
        )
    return init_from.step


def _config_hash(meta: dict) -> str:
    """Identifies the source checkpoint's settings: its saved meta (model, mixture, seed, and
    its own init record, so a chain of stages hashes its whole lineage)."""
    return "sha256:" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _check_resume(saved: dict, init_from: InitFrom | None, step: int) -> dict:
    """The saved init record, if ``init_from`` asks for the same init; refused by name if not.

    A resume never re-initialises, so another ``init_from`` would silently do nothing. The source
    is not read again: it may have moved on (a newer checkpoint) or been cleaned up since.
    """
    recorded = saved.get(INIT_KEY) or {}
    requested = init_from.request() if init_from else {"run_dir": None}
    if found := differences({"InitFrom": recorded}, {"InitFrom": requested}):
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} belongs to a run initialised from "
            f"{recorded or 'nothing (a fresh start)'}, not as train.init_from says now "
            f"({', '.join(found)}); resume with the init it started with, or start a new --run_dir"
        )
    return recorded
