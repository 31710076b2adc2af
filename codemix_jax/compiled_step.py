"""A train step compiled ahead of time (`codemix aot --save_compiled`), loaded by `codemix train`.

Compiling a large step takes minutes on every host of a pod; loading the saved executable takes
seconds. An executable runs whatever it was compiled from, so the file carries the signature of its
program (versions, devices, every argument's layout and a hash of the traced step) and a run loads
it only when its own signature is the same; otherwise it stops before writing anything, naming
the difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle

import jax
import jaxlib
import tensorflow as tf
from jax.experimental import serialize_executable

from codemix_jax.train_state import TrainProgram

log = logging.getLogger(__name__)

SHOWN_DIFFERENCES = 4


def signature(program: TrainProgram, lowered: jax.stages.Lowered) -> dict[str, str]:
    """What a saved step must share with a run, item by item, in readable form.

    The traced step's hash covers what shapes do not show: optimizer, schedule, loss and model
    settings. Device ids in mesh order matter because the executable is bound to them.
    """
    mesh = program.mesh
    first = mesh.devices.flat[0]
    items = {
        "jax": f"{jax.__version__} (jaxlib {jaxlib.__version__})",
        "devices": f"{mesh.size} {first.platform} devices ({first.device_kind})",
        "mesh": str(dict(mesh.shape)),
        "device ids": " ".join(str(device.id) for device in mesh.devices.flat),
    }
    arguments = {"state": program.abstract_state, "batch": program.abstract_batch}
    for path, leaf in jax.tree_util.tree_leaves_with_path(arguments):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        items[name] = f"{leaf.dtype}{list(leaf.shape)} sharded {tuple(leaf.sharding.spec)}"
    items["traced step"] = "sha256 " + hashlib.sha256(lowered.as_text().encode()).hexdigest()
    return items


def save(compiled: jax.stages.Compiled, *, signature: dict[str, str], path: str) -> None:
    """The serialized executable, its argument and result trees, and its program's signature."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    saved = {"executable": payload, "in_tree": in_tree, "out_tree": out_tree}
    with tf.io.gfile.GFile(path, "wb") as f:
        pickle.dump({**saved, "signature": signature}, f)


def load(program: TrainProgram, path: str) -> TrainProgram:
    """``program`` with its step replaced by the executable saved at ``path``, if it is the same.

    Call inside the program's mesh and logical axis rules: the step is traced (not compiled) to
    compare signatures. The file is unpickled: load only steps you saved yourself.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"no compiled step at {path} (train.compiled_step); save one with "
            "`codemix aot --save_compiled PATH` and the run's gin files"
        )
    with tf.io.gfile.GFile(path, "rb") as f:
        saved = pickle.load(f)
    _check_same(saved.get("signature", {}), signature(program, program.lower()), path)
    devices = list(program.mesh.devices.flat)
    step = serialize_executable.deserialize_and_load(
        saved["executable"],
        saved["in_tree"],
        saved["out_tree"],
        backend=devices[0].client,
        execution_devices=devices,
    )
    log.info("loaded the compiled train step from %s (not compiling it)", path)
    return dataclasses.replace(program, step=step)


def _check_same(saved: dict[str, str], now: dict[str, str], path: str) -> None:
    differences = [
        f"{item}: saved {saved.get(item, 'nothing')} vs now {now.get(item, 'nothing')}"
        for item in {**saved, **now}
        if saved.get(item) != now.get(item)
    ]
    if differences:
        more = len(differences) - SHOWN_DIFFERENCES
        raise ValueError(
            f"the compiled step at {path} is not this run's step: "
            + "; ".join(differences[:SHOWN_DIFFERENCES])
            + (f"; and {more} more" if more > 0 else "")
            + ". Compile it again with this run's gin files (`codemix aot --save_compiled`)."
        )
