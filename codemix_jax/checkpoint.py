"""Orbax checkpoints holding the train state, every host's input position, and run metadata.

A step's checkpoint has three items: ``state`` (sharded params, optimizer state, step; restored
straight into the current mesh's shardings), ``data`` (one tf.data iterator state per process, so
the input resumes exactly where it stopped), and ``meta`` (JSON: the run's identity, see
``run_identity``, used to refuse a checkpoint of another run before touching any array).
``Checkpoints`` writes and resumes a run's own checkpoints; ``SavedRun`` reads another run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from etils import epath
from jax.experimental import multihost_utils

from codemix_jax.data.mixture import HostBatches, write_position


@dataclasses.dataclass(frozen=True)
class RestoreFailure:
    """What an item handler's restore returns instead of raising (see ``failure_returned``)."""

    error: Exception


def failure_returned(restore: Callable[..., Any]) -> Callable[..., Any]:
    """An item handler's ``restore`` that returns a ``RestoreFailure`` instead of raising.

    Orbax's restore ends in a barrier of all processes. A host that fails to read its own shards
    (a file damaged that only it reads) must still reach it, or the others wait there, or meet
    its next collective instead. ``raise_failures`` raises the failure after the barrier, and the
    processes agree on it (``recovery.restore_together``).
    """

    @functools.wraps(restore)
    def returning(self: Any, directory: epath.Path, *args: Any, **kwargs: Any) -> Any:
        sys.unraisablehook = _drop_abandoned_reads
        try:
            return restore(self, directory, *args, **kwargs)
        except Exception as error:
            return RestoreFailure(error)

    return returning


def _drop_abandoned_reads(unraisable: Any) -> None:
    """``sys.unraisablehook`` from the first restore on: the reads a failed restore leaves in
    flight report back to orbax's event loop, closed by then, each with a traceback ("Event loop
    is closed"). Those are dropped (the failure itself is reported once); everything else goes to
    Python's hook. Installed before the restore, not once it failed: the loop closes inside
    orbax, and a read can report back before the failure reaches ``failure_returned``."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def raise_failures(restored: Any) -> Any:
    """``restored`` (orbax's composite of items), or the first item's ``RestoreFailure`` raised."""
    for item in restored.values():
        if isinstance(item, RestoreFailure):
            raise item.error
    return restored


class StateHandler(ocp.StandardCheckpointHandler):
    """The train state's arrays, restored straight into the current mesh's shardings."""

    restore = failure_returned(ocp.StandardCheckpointHandler.restore)


class PartialStateHandler(ocp.PyTreeCheckpointHandler):
    """Another run's train state, of which a part can be restored (``SavedRun``)."""

    restore = failure_returned(ocp.PyTreeCheckpointHandler.restore)


class MetaHandler(ocp.JsonCheckpointHandler):
    """The run's identity, as JSON."""

    restore = failure_returned(ocp.JsonCheckpointHandler.restore)


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves each process's input position (a ``HostBatches.position`` snapshot) in its own
    sub-directory of the item."""

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        path = _process_dir(directory)
        path.mkdir(parents=True, exist_ok=True)
        write_position(args.position, str(path / POSITION_FILE))

    @failure_returned
    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> HostBatches:
        path = _process_dir(directory)
        if not path.exists():
            if found := _other_process_count(directory):
                raise CheckpointMismatchError(
                    f"the input positions in {directory} are {found}: written by another number "
                    f"of processes than this run's {jax.process_count()}"
                )
            raise FileNotFoundError(f"no input position for this process in {directory}")
        try:
            args.iterator.restore(str(path / POSITION_FILE))
        except tf.errors.OpError as error:
            raise OSError(
                f"input position of process {jax.process_index()}: {error.message}"
            ) from None
        return args.iterator


POSITION_FILE = "position"


def _other_process_count(data: epath.Path) -> list[str]:
    """The input positions in the ``data`` item if another number of processes wrote them."""
    found = sorted(p.name for p in data.iterdir())
    ours = f"-of-{jax.process_count()}"
    return [] if any(name.endswith(ours) for name in found) else found


def _process_dir(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}"


@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    position: tf.Tensor


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


def checkpoint_dir(run_dir: str) -> str:
    """Where a run keeps its checkpoints: one place, for the run itself and for those reading it."""
    return os.path.abspath(os.path.join(run_dir, "checkpoints"))


def _registry(
    *, state: tuple[ocp.CheckpointHandler, type, type]
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax's handlers for the three items, by item and args class (the ``state`` handler and
    its save and restore args vary): orbax maps an args class to its own handler class only."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, (handler, save, restore) in {
        "state": state,
        "data": (DataIteratorHandler(), DataIteratorSave, DataIteratorRestore),
        "meta": (MetaHandler(), ocp.args.JsonSave, ocp.args.JsonRestore),
    }.items():
        registry.add(item, save, handler)
        registry.add(item, restore, handler)
    return registry


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return raise_failures(restored)["meta"]


class Checkpoints:
    """Periodic, asynchronous checkpoints of one run, with a keep policy for evaluation.

    Orbax writes each checkpoint synchronously, but on a thread of its own (``_writer``): the
    training thread only copies the state on its devices and hands it over. Orbax's own
    asynchronous save keeps its bookkeeping (barriers, a dozen threads started, directory checks,
    the input snapshot) on the training thread: tens of milliseconds per save on a CPU host.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every: int,
        keep: int = 3,
        keep_every: int = 0,
        asynchronous: bool = True,
    ):
        """Keeps the newest ``keep`` checkpoints, plus for good every one whose step is a multiple
        of ``keep_every`` (0: none), which must then be a multiple of ``save_every``.

        ``asynchronous=False`` writes inside ``save`` (for benchmarking the difference). The
        directory is created by the first save, so a run refused at its start leaves nothing.
        Every process must save the same steps in the same order (orbax's barriers pair them).
        """
        if save_every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 (the newest one resumes), got {keep}")
        if keep_every < 0 or keep_every % save_every:
            raise ValueError(
                f"keep_every={keep_every} must be 0 (off) or a multiple of the checkpoint "
                f"interval {save_every}: only saved steps can be kept"
            )
        self._save_every = save_every
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=False,  # the writer thread is the asynchrony
            create=False,
            # Barriers of jax.distributed's key-value store, not collectives on the devices:
            # those, issued from the writer thread, would interleave with the steps'.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                active_processes=set(range(jax.process_count()))
            ),
        )
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=options,
            handler_registry=_registry(
                state=(StateHandler(), ocp.args.StandardSave, ocp.args.StandardRestore)
            ),
        )
        self._writer = (
            ThreadPoolExecutor(1, "checkpoint_writer", initializer=_yield_to_training)
            if asynchronous
            else None
        )
        self._writing: Future[None] | None = None

    def latest_step(self) -> int | None:
        self.wait()
        return self._manager.latest_step()

    def meta(self, step: int) -> dict:
        """The run identity saved with ``step`` (see ``run_identity``)."""
        return _read_meta(self._manager, step)

    def due(self, step: int) -> bool:
        """Whether ``step`` is on the checkpoint interval."""
        return step % self._save_every == 0

    def save(self, step: int, *, state: Any, batches: HostBatches, meta: dict) -> None:
        """Save ``step``, after the previous save is written.

        Asynchronously, the state is copied on its devices (the next step may then donate it;
        the copy lives until the writer has it on the host) and the writer thread takes the
        input position (``batches`` draws its next batch after that) and writes both.
        """
        self.wait()
        if self._writer is None:
            self._write(step, state, batches.position(), meta)
            return
        copy = jax.device_put(state, _shardings(state), may_alias=False)
        position = batches.position_on(self._writer)
        self._writing = self._writer.submit(self._write_when_ready, step, copy, position, meta)

    def _write_when_ready(
        self, step: int, state: Any, position: Future[tf.Tensor], meta: dict
    ) -> None:
        """On the writer thread: once the step and the copy are done, write them (orbax's
        bookkeeping then runs beside the next step, not this one)."""
        jax.block_until_ready(state)
        self._write(step, state, position.result(), meta)

    def _write(self, step: int, state: Any, position: tf.Tensor, meta: dict) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataIteratorSave(position),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, *, abstract_state: Any, batches: HostBatches, meta: dict) -> Any:
        """Restore ``step`` into ``abstract_state``'s shardings and rewind ``batches`` to it."""
        self._check_committed(step)
        check_same_run(self.meta(step), meta, step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataIteratorRestore(batches),
            ),
        )
        return raise_failures(restored)["state"]

    def _check_committed(self, step: int) -> None:
        """Refuses a step without orbax's commit time: its save (or a copy of it) never finished.

        Orbax records the commit time in the step's _CHECKPOINT_METADATA just before it renames
        the temporary directory into place; the arrays may restore without it, possibly short.
        """
        found = ocp.path.step.standard_name_format().find_step(self._manager.directory, step)
        if found.commit_timestamp_nsecs is None:
            raise FileNotFoundError(
                f"{found.path} has no commit time in its _CHECKPOINT_METADATA: its save or copy "
                "did not finish"
            )

    @property
    def damaged_directory(self) -> epath.Path:
        """Where ``set_aside`` moves damaged steps: beside the checkpoints, out of orbax's sight."""
        directory = self._manager.directory
        return directory.parent / f"{directory.name}_damaged"

    def set_aside(self, step: int) -> epath.Path:
        """Move ``step`` to ``damaged_directory/<step>-<UTC time>`` (never deleted), where orbax
        neither resumes it nor counts it for the keep policy; returns the new path.

        Every process must call this; process 0 renames, the others wait for it.
        """
        now = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        target = self.damaged_directory / f"{step}-{stamp}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self._manager.directory / str(step)).rename(target)
        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Block until the pending save is on disk; raises what failed in writing it."""
        writing, self._writing = self._writing, None
        if writing is not None:
            with _writer_at_full_priority():
                writing.result()

    def describe_latest(self) -> str:
        """The newest checkpoint, in words for a message."""
        step = self.latest_step()
        where = self._manager.directory
        return f"step {step} in {where}" if step is not None else f"none yet (in {where})"

    def close(self) -> None:
        """Wait for the pending save, then release the manager and the writer thread."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
            self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _shardings(tree: Any) -> Any:
    """Each array's own sharding: ``device_put`` to it copies a multi-host array in place."""
    return jax.tree.map(lambda array: array.sharding, tree)


def _yield_to_training() -> None:
    """Lowest CPU priority for the calling thread and the threads it starts (Linux's SCHED_IDLE:
    it runs only on CPUs nothing else wants): on a host whose CPUs also run the steps, writing
    must not slow them. There it may finish some steps later; the next save waits for it."""
    os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


@contextlib.contextmanager
def _writer_at_full_priority() -> Iterator[None]:
    """While the training thread waits for a save (the final one, one at a stop, or one the next
    save caught up with), it has nothing to yield to: this process's SCHED_IDLE threads (the
    writer and the threads it started) run at normal priority, idle again afterwards. Without
    it, on a busy host the last save of a run waited for CPUs that never fell idle."""
    raised = _set_policy(_idle_threads(), os.SCHED_OTHER)
    try:
        yield
    finally:
        _set_policy(raised, os.SCHED_IDLE)


def _idle_threads() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            if os.sched_getscheduler(int(name)) == os.SCHED_IDLE:
                found.append(int(name))
    return found


def _set_policy(thread_ids: list[int], policy: int) -> list[int]:
    """The threads whose policy was set; one that ended, or that we may not raise, is left."""
    done = []
    for thread_id in thread_ids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setscheduler(thread_id, policy, os.sched_param(0))
            done.append(thread_id)
    return done


class SavedRun:
    """Another run's checkpoints, read only: where a new stage takes its initial state from."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            handler_registry=_registry(
                state=(PartialStateHandler(), ocp.args.PyTreeSave, ocp.args.PyTreeRestore)
            ),
        )

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def meta(self, step: int) -> dict:
        return _read_meta(self._manager, step)

    def restore_state(self, step: int, parts: dict[str, Any]) -> dict[str, Any]:
        """Only the named parts of the saved train state (e.g. ``{"params": abstract}``), each
        restored into its abstract tree's shardings: saved by any mesh or number of processes.

        Refused, naming the entries, unless the saved parts hold exactly these arrays (orbax
        would leave a missing one unrestored; another optimizer's state has other entries).
        """
        saved = self._manager.item_metadata(step)["state"].tree
        saved_shapes = {
            array.name: array.shape
            for array in jax.tree.leaves(saved)
            if array.name.split(".")[0] in parts
        }
        wanted = {
            ".".join(_key_name(key) for key in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(parts)
        }
        if found := _tree_differences(saved_shapes, wanted):
            raise CheckpointMismatchError(
                f"{self.directory} step {step} holds another {' and '.join(parts)} than this "
                f"run's ({found})"
            )
        args = ocp.args.PyTreeRestore(
            item=parts,
            restore_args=ocp.checkpoint_utils.construct_restore_args(parts),
            partial_restore=True,
        )
        restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
        return raise_failures(restored)["state"]


def _key_name(key: Any) -> str:
    """A pytree path entry as orbax names it (dict key, attribute or index)."""
    for field in ("key", "name", "idx"):
        if hasattr(key, field):
            return str(getattr(key, field))
    raise TypeError(f"unexpected pytree key {key!r}")


def _tree_differences(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str:
    """Arrays missing from ``saved``, not wanted, or of another shape; the first few of each."""
    kinds = {
        "missing": sorted(wanted.keys() - saved.keys()),
        "not in this run": sorted(saved.keys() - wanted.keys()),
        "other shape": sorted(k for k in wanted.keys() & saved.keys() if saved[k] != wanted[k]),
    }
    return "; ".join(f"{kind}: {', '.join(names[:3])}" for kind, names in kinds.items() if names)


def differences(saved: dict, current: dict) -> list[str]:
    """``section.key: saved X vs now Y`` for each field of ``current`` that ``saved`` does not
    share, less the runtime-only fields."""
    return [
        f"{section}.{key}: saved {saved.get(section, {}).get(key)!r} vs now {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if (section, key) not in RUNTIME_ONLY_FIELDS
        and saved.get(section, {}).get(key) != _as_json(value)
    ]


def check_same_run(saved: dict, current: dict, step: int) -> None:
    """Refuses a checkpoint's ``saved`` meta unless it matches ``current``, naming each field."""
    if found := differences(saved, current):
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} was written with other settings "
            f"({', '.join(found)}); resume with the settings it was written with, or "
            "start a new --run_dir"
        )


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from the JSON meta item (tuples become lists)."""
    return json.loads(json.dumps(value))
