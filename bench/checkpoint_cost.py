"""Checkpoint cost: how long a save step stalls training (async vs sync orbax), and restore time.

For each model it builds the train step and ``Checkpoints`` exactly as ``codemix train`` does
(gin/experiments/smoke.gin on the local corpus, one CPU device, float32) and times, in rounds:

- ``step``: a plain step as the loop runs it, from dispatch until the step is ready and the next
  batch drawn (the loop draws it while the step runs);
- ``async``: the same with an asynchronous ``Checkpoints.save`` after the dispatch, until
  training could go on (the next batch waits for the input snapshot taken on the writer thread);
- ``sync``: the same with the write inside ``save`` (``asynchronous=False``);
- ``after``: the step right after an async save, while the write runs in the background;
- ``copy``: the copy of the state that ``save`` makes on its devices (the writer thread copies it
  to the host; on CPU that is the whole copy), dispatch to ready;
- ``input``: the input position's snapshot alone (``HostBatches.position``), and its size;
- ``restore``: ``Checkpoints.restore`` of the newest checkpoint (state and input position).

The target: a save step stalls training by at most 5 % of a step beyond the copy, that is
``(async - step - copy) / step <= 0.05``, taken in each round (a save step against the plain
step just before it, on a host whose load drifts) and reported as the median over the rounds.
Columns are medians too; checkpoints go to --dir.

    .venv/bin/python bench/checkpoint_cost.py [--models tiny,200m,470m] [--dir /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import shutil
import statistics
import tempfile
import time

import gin
import jax
import tensorflow as tf
from flax import linen as nn

from codemix_jax import gin_config
from codemix_jax.checkpoint import Checkpoints, run_identity
from codemix_jax.data.mixture import HostBatches
from codemix_jax.train_state import (
    TrainProgram,
    TrainState,
    build_train_program,
    global_batch,
    init_train_state,
)

TARGET = 0.05


@dataclasses.dataclass(frozen=True)
class Model:
    gin_file: str
    batch: int  # global batch rows of 128 tokens
    rounds: int
    bindings: tuple[str, ...] = ()


# The tiny model as the smoke run trains it; paper A's 470M layers with the local 2048-piece
# vocabulary (203.4M parameters, 2.4 GB of float32 params and Adam moments); and the whole 470M
# (463.5M with its 256K vocabulary, 5.6 GB). On CPU an async save keeps the saved buffers while
# the next step allocates new ones, so the peak is several times the state: about 21 GB for the
# 470M, which fits this 24 GB machine only when nobody else is using it. One 128-token row keeps
# a step at seconds on 2 cores.
MODELS = {
    "tiny": Model("gin/models/tiny.gin", batch=32, rounds=40),
    "200m": Model(
        "gin/models/470m.gin", batch=1, rounds=5, bindings=("ModelConfig.vocab_size = 2048",)
    ),
    "470m": Model("gin/models/470m.gin", batch=1, rounds=3),
}


@dataclasses.dataclass
class Steps:
    """Train steps as the loop runs them, each optionally followed by a save, timed."""

    program: TrainProgram
    state: TrainState
    batches: HostBatches
    meta: dict
    count: int = 0
    batch: dict | None = None

    def run(self, save: Checkpoints | None = None) -> float:
        """Seconds from dispatching a step (saved if asked) to its state being ready and the next
        batch drawn, in the train loop's order."""
        batch = self.batch or self._draw()
        self.count += 1
        start = time.perf_counter()
        self.state, _ = self.program.step(self.state, batch)
        if save:
            save.save(self.count, state=self.state, batches=self.batches, meta=self.meta)
        self.batch = self._draw()
        jax.block_until_ready(self.state)
        return time.perf_counter() - start

    def _draw(self) -> dict:
        return global_batch(next(self.batches), self.program.mesh)

    def copy(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(self.state, may_alias=False))
        return time.perf_counter() - start

    def snapshot_input(self) -> tuple[float, int]:
        """Seconds to snapshot the input position, and the position's size in bytes."""
        start = time.perf_counter()
        position = self.batches.position()
        seconds = time.perf_counter() - start
        return seconds, len(tf.io.serialize_tensor(position).numpy())


def measure(model: Model, *, corpus_dir: str, vocab_path: str, directory: str) -> dict:
    gin_config.parse(
        ["gin/experiments/smoke.gin", model.gin_file],
        [
            f"local_sources.corpus_dir = '{corpus_dir}'",
            f"MixtureInput.vocab_path = '{vocab_path}'",
            f"MixtureInput.global_batch_size = {model.batch}",
            *model.bindings,
        ],
    )
    args = gin.get_bindings("train")
    dataset, rules = args["dataset"], args["rules"]
    with jax.set_mesh(args["mesh"]), nn.logical_axis_rules(rules):
        wanted = inspect.signature(build_train_program).parameters
        program = build_train_program(**{k: v for k, v in args.items() if k in wanted})
        meta = run_identity(
            model_config=args["model_config"], input_settings=dataset.stream_settings(), seed=0
        )
        steps = Steps(
            program,
            init_train_state(
                model=program.model, tx=program.tx, shardings=program.shardings, seed=0
            ),
            dataset.host_batches(),
            meta,
        )
        saves = {
            mode: Checkpoints(
                os.path.join(directory, mode), save_every=1, keep=1, asynchronous=mode == "async"
            )
            for mode in ("async", "sync")
        }
        steps.run(), steps.run()  # compile, warm up
        kinds = ("step", "async", "after", "sync", "copy", "input")
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(model.rounds):
            times["step"].append(steps.run())
            times["async"].append(steps.run(saves["async"]))
            times["after"].append(steps.run())
            saves["async"].wait()
            times["sync"].append(steps.run(saves["sync"]))
            times["copy"].append(steps.copy())
            seconds, input_bytes = steps.snapshot_input()
            times["input"].append(seconds)
        for save in saves.values():
            save.close()
        state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(steps.state))
        steps.state = None  # free it before restoring another
        checkpoints = Checkpoints(os.path.join(directory, "async"), save_every=1)
        batches = dataset.host_batches()
        start = time.perf_counter()
        restored = checkpoints.restore(
            checkpoints.latest_step(),
            abstract_state=program.abstract_state,
            batches=batches,
            meta=meta,
        )
        jax.block_until_ready(restored)
        restore = time.perf_counter() - start
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    stall = statistics.median(
        (save - step - copy) / step
        for save, step, copy in zip(times["async"], times["step"], times["copy"], strict=True)
    )
    return {
        **medians,
        "restore": restore,
        "stall": stall,
        "state_gb": state_bytes / 1e9,
        "input_mb": input_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,200m", help=f"of {sorted(MODELS)}")
    parser.add_argument("--corpus_dir", default="data/local/corpus")
    parser.add_argument("--vocab_path", default="data/local/spm.model")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    print(
        f"{'model':>6} {'state GB':>8} {'step s':>8} {'async s':>8} {'sync s':>8} "
        f"{'after s':>8} {'copy s':>8} {'input s':>8} {'input MB':>8} {'restore s':>9} "
        f"{'stall/step':>10}  vs 5 %"
    )
    for name in args.models.split(","):
        directory = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
        row = measure(
            MODELS[name],
            corpus_dir=args.corpus_dir,
            vocab_path=args.vocab_path,
            directory=os.path.join(directory, name),
        )
        shutil.rmtree(os.path.join(directory, name))
        verdict = "met" if row["stall"] <= TARGET else "NOT met"
        print(
            f"{name:>6} {row['state_gb']:8.3f} {row['step']:8.3f} {row['async']:8.3f} "
            f"{row['sync']:8.3f} {row['after']:8.3f} {row['copy']:8.4f} {row['input']:8.3f} "
            f"{row['input_mb']:8.2f} "
            f"{row['restore']:9.3f} "
            f"{row['stall']:10.1%}  {verdict} ({row['stall'] / TARGET:.1f}x the target)"
        )


if __name__ == "__main__":
    main()
