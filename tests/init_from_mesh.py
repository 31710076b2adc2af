"""Subprocess helper for test_init_from: checkpoints written on one mesh and process count, taken
as a new stage's start on another. Each mode needs its own process (devices are fixed at start).

``python tests/init_from_mesh.py write '<json>' PORT PROCESS_ID``: one of two processes (2 CPU
devices each, mesh fsdp=4) saves a fresh train state (seed 1) as step 1 of ``run_dir``, through
``Checkpoints`` as ``codemix train`` does.

``python tests/init_from_mesh.py init '<json>'``: on 8 CPU devices under ``data=2, fsdp=4``,
``start_state`` takes each of ``sources`` (``[run_dir, step]`` pairs) with its optimizer state; for
source ``i`` it writes ``out/<i>.npz``, the leaves of the restored ``{"params", "opt_state"}``
(``jax.tree.leaves`` order) and ``step``, and prints ``RESULT {"mesh": ..., "misplaced": [...]}``:
per source, the arrays not laid out as the run's own state shardings, as orbax restores them and
in the stage's first state.

Both read ``bindings`` (gin, for the data paths) from the JSON.
"""

import json
import os
import sys

import jax

MODE, SPEC = sys.argv[1], json.loads(sys.argv[2])
jax.config.update("jax_num_cpu_devices", 2 if MODE == "write" else 8)
if MODE == "write":
    jax.distributed.initialize(f"localhost:{sys.argv[3]}", 2, int(sys.argv[4]))

import gin  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from codemix_jax import gin_config  # noqa: E402
from codemix_jax.checkpoint import Checkpoints, SavedRun, run_identity  # noqa: E402
from codemix_jax.init_from import InitFrom, start_state  # noqa: E402
from codemix_jax.train_state import build_train_program, init_train_state  # noqa: E402

MESHES = {
    "write": ["make_mesh.fsdp = 4"],
    "init": ["make_mesh.data = 2", "make_mesh.fsdp = 4", "MixtureInput.global_batch_size = 8"],
}


def main() -> None:
    gin_config.parse(["gin/experiments/smoke.gin"], [*SPEC["bindings"], *MESHES[MODE]])
    args = gin.get_bindings("train")
    dataset, mesh = args["dataset"], args["mesh"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(args["rules"]):
        program = build_train_program(
            model_config=args["model_config"],
            dataset=dataset,
            mesh=mesh,
            rules=args["rules"],
            learning_rate=args["learning_rate"],
            optimizer=args["optimizer"],
        )
        meta = run_identity(
            model_config=args["model_config"], input_settings=dataset.stream_settings(), seed=0
        )
        (write if MODE == "write" else init)(program, dataset, meta)


def write(program, dataset, meta) -> None:
    checkpoints = Checkpoints(os.path.join(SPEC["run_dir"], "checkpoints"), save_every=1)
    state = init_train_state(
        model=program.model, tx=program.tx, shardings=program.shardings, seed=1
    )
    batches = dataset.host_batches(
        process_index=jax.process_index(), process_count=jax.process_count()
    )
    checkpoints.save(1, state=state, batches=batches, meta=meta)
    checkpoints.close()


def init(program, dataset, meta) -> None:
    misplaced = []
    abstract = program.abstract_state
    parts = {"params": abstract.params, "opt_state": abstract.opt_state}
    for index, (run_dir, step) in enumerate(SPEC["sources"]):
        # Orbax reads each array straight into its shards here (no gathering on one host)...
        restored = SavedRun(os.path.join(run_dir, "checkpoints")).restore_state(step, parts)
        # ...and the stage starts from them as codemix train starts it.
        state, start, _ = start_state(
            checkpoints=Checkpoints(os.path.join(SPEC["out"], f"empty_{index}"), save_every=1),
            program=program,
            batches=dataset.host_batches(),
            meta=meta,
            seed=0,
            init_from=InitFrom(run_dir, step=step, with_optimizer=True),
        )
        misplaced.append(_misplaced(restored, parts) + _misplaced(state, abstract))
        leaves = jax.tree.leaves({"params": state.params, "opt_state": state.opt_state})
        arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
        np.savez(os.path.join(SPEC["out"], f"{index}.npz"), step=start, **arrays)
    print("RESULT " + json.dumps({"mesh": dict(program.mesh.shape), "misplaced": misplaced}))


def _misplaced(arrays, abstract) -> int:
    """How many of ``arrays`` are not laid out as their abstract counterparts say."""
    placed = jax.tree.map(
        lambda array, want: getattr(array, "sharding", None) == want.sharding, arrays, abstract
    )
    return sum(not ok for ok in jax.tree.leaves(placed))


if __name__ == "__main__":
    main()
