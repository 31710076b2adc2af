"""Orbax checkpoints holding the train state, every host's input position, and run metadata.

A step's checkpoint has three items: ``state`` (sharded params, optimizer state, step; restored
straight into the current mesh's shardings), ``data`` (one tf.data iterator state per process, so
the input resumes exactly where it stopped), and ``meta`` (JSON: the run's identity, see
``run_identity``, used to refuse a checkpoint of another run before touching any array).
"""

from __future__ import annotations

import dataclasses
import json
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


# Settings a resumed run may change: they change how the model runs, not what it computes.
RUNTIME_ONLY_FIELDS = frozenset(
    {("ModelConfig", "dtype"), ("ModelConfig", "remat"), ("ModelConfig", "attention")}
)


class CheckpointMismatchError(ValueError):
    """A checkpoint written by another model or another input stream than the current run's."""


def run_identity(*, model_config: Any, input_settings: dict, seed: int) -> dict:
    """What a checkpoint must share with the run that resumes it, by gin configurable name.

    The model's dimensions (else the arrays do not fit), the input stream's settings (else the
    saved read position would continue another stream: other rows, shares or order) and the init
    seed (a resume never re-initialises, so a new seed would silently have no effect).
    """
    return {
        "ModelConfig": dataclasses.asdict(model_config),
        "MixtureInput": input_settings,
        "train": {"seed": seed},
    }


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
        _check_same_run(saved["meta"], meta, step)
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


def _check_same_run(saved: dict, current: dict, step: int) -> None:
    differences = [
        f"{section}.{key}: saved {saved.get(section, {}).get(key)!r} vs now {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if (section, key) not in RUNTIME_ONLY_FIELDS
        and saved.get(section, {}).get(key) != _as_json(value)
    ]
    if differences:
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} was written with other settings "
            f"({', '.join(differences)}); resume with the settings it was written with, or "
            "start a new --run_dir"
        )


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from the JSON meta item (tuples become lists)."""
    return json.loads(json.dumps(value))
