"""What a run directory holds, read without writing: the newest checkpoint step, the identity
saved with a checkpoint, and the learning rate logged at a step.

The experiment runner decides from these whether a stage is finished (its newest checkpoint is at
its last step), and a stage that continues another reads that stage's last LR from here rather
than from a retyped number.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp
from etils import epath

from codemix_jax.checkpoint import checkpoint_dir


def _checkpoints(run_dir: str) -> epath.Path:
    return epath.Path(checkpoint_dir(run_dir))


def latest_step(run_dir: str) -> int | None:
    """The newest finished checkpoint's step (an interrupted save does not count); None if none."""
    directory = _checkpoints(run_dir)
    if not directory.exists():
        return None
    latest = ocp.path.step.latest_step_metadata(directory, ocp.path.step.standard_name_format())
    return None if latest is None else latest.step


def saved_identity(run_dir: str, step: int) -> dict:
    """The run identity (``checkpoint.run_identity``) saved with the checkpoint at ``step``."""
    meta = _checkpoints(run_dir) / str(step) / "meta"
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta)


def logged_learning_rate(run_dir: str, step: int) -> float | None:
    """The learning rate of the last record for ``step`` in metrics.jsonl; None if none."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rates = [record["learning_rate"] for record in records if record["step"] == step]
    return rates[-1] if rates else None
