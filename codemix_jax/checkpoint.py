"""Orbax checkpoints holding the train state, every host's input position, and run metadata.

A step's checkpoint has three items: ``state`` (sharded params, optimizer state, step; restored
straight into the current mesh's shardings), ``data`` (one tf.data iterator state per process, so
the input resumes exactly where it stopped), and ``meta`` (JSON: the model config, used to refuse
a checkpoint written by another model before touching any array).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from codemix_jax.data.mixture import HostBatches


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves each process's input iterator in its own sub-directory of the item."""

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        path = _process_dir(directory)
        path.mkdir(parents=True, exist_ok=True)
        args.iterator.save(str(path / "iterator"))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> HostBatches:
        path = _process_dir(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"no input state for this process in {directory} (found "
                f"{sorted(p.name for p in directory.iterdir())}); was it written with another "
                "number of processes?"
            )
        args.iterator.restore(str(path / "iterator"))
        return args.iterator


def _process_dir(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}"


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: HostBatches


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: HostBatches


# Model settings that change how the model runs but not its parameters.
RUNTIME_ONLY_FIELDS = frozenset({"dtype", "remat"})


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a different model than the one being trained."""


class Checkpoints:
    """Periodic, asynchronous checkpoints of one run, keeping the newest ``keep``."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3):
        if save_every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {save_every}")
        self._save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataIteratorHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self, step: int, *, state: Any, batches: HostBatches, meta: dict, force: bool = False
    ) -> bool:
        """Save if ``step`` is a multiple of the interval (or ``force``); returns whether it did.

        Arrays are copied off the devices before returning and written in the background.
        """
        if step % self._save_every and not force:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataIteratorSave(batches),
            meta=ocp.args.JsonSave(meta),
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, *, abstract_state: Any, batches: HostBatches, meta: dict) -> Any:
        """Restore ``step`` into ``abstract_state``'s shardings and rewind ``batches`` to it."""
        saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        _check_same_model(saved["meta"], meta, step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataIteratorRestore(batches),
            ),
        )
        return restored["state"]

    def close(self) -> None:
        """Wait for pending writes, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _check_same_model(saved: dict, current: dict, step: int) -> None:
    saved_model, current_model = saved.get("model_config", {}), current["model_config"]
    differences = {
        key: (saved_model.get(key), value)
        for key, value in current_model.items()
        if key not in RUNTIME_ONLY_FIELDS and saved_model.get(key) != value
    }
    if differences:
        described = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in differences.items())
        raise CheckpointMismatchError(
            f"checkpoint at step {step} was written by a different model ({described})"
        )
