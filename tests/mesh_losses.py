"""Subprocess helper for test_sharding: train a tiny model 3 steps under each mesh, print metrics.

Run as ``python tests/mesh_losses.py '<json list of make_mesh kwargs>'``; it needs its own process
because the 8 fake CPU devices must be configured before JAX starts. An entry may also set
``num_devices``, ``microbatches`` (``train.microbatches``) and ``chunk_size``
(``token_losses.chunk_size``).
"""

import functools
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import gin  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from codemix_jax import optim, sharding  # noqa: E402
from codemix_jax.microbatches import split_microbatches  # noqa: E402
from codemix_jax.model import ModelConfig, Transformer  # noqa: E402
from codemix_jax.train_state import (  # noqa: E402
    global_batch,
    init_train_state,
    make_train_step,
    state_layout,
)

CONFIG = ModelConfig(
    vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_seq_len=32
)


def packed_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """8 rows of 32 tokens: two documents split at a random point, then row i's last i tokens are
    padding. Every row then has its own token count, so a lost or repeated row shows in the
    per-source token counts."""
    index = np.arange(32)[None, :]
    split = rng.integers(4, 20, size=(8, 1))
    real = index < 32 - np.arange(8)[:, None]
    segment_ids = np.where(real, np.where(index < split, 1, 2), 0).astype(np.int32)
    positions = np.where(real, np.where(index < split, index, index - split), 0).astype(np.int32)
    targets = np.where(real, rng.integers(3, CONFIG.vocab_size, size=(8, 32)), 0).astype(np.int32)
    inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
    source_id = (np.arange(8) % 2).astype(np.int32)
    return dict(
        inputs=inputs,
        targets=targets,
        segment_ids=segment_ids,
        positions=positions,
        source_id=source_id,
    )


def split_collectives(mesh, microbatches: int) -> list[str]:
    """The collectives XLA needs to split the batch into microbatches: none, if every device
    keeps its own rows."""
    split = functools.partial(split_microbatches, microbatches=microbatches, mesh=mesh)
    lowered = jax.jit(split).lower(global_batch(packed_batch(np.random.default_rng(0)), mesh))
    text = lowered.compile().as_text()
    kinds = ("all-to-all", "all-gather", "all-reduce", "collective-permute", "reduce-scatter")
    return [kind for kind in kinds if kind in text]


def metrics_on(mesh_kwargs: dict) -> dict[str, list]:
    """Per step: the mean loss and the train step's grad norm, per-source loss sums and tokens."""
    devices = jax.devices()[: mesh_kwargs.pop("num_devices", 8)]
    microbatches = mesh_kwargs.pop("microbatches", 1)
    gin.bind_parameter("token_losses.chunk_size", mesh_kwargs.pop("chunk_size", 0))
    mesh = sharding.make_mesh(devices=devices, **mesh_kwargs)
    rules = sharding.logical_axis_rules()
    tx = optim.adamw(optax.constant_schedule(1e-3))
    model = Transformer(CONFIG)
    batch = packed_batch(np.random.default_rng(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings = state_layout(model=model, tx=tx, mesh=mesh, rules=rules)
        state = init_train_state(model=model, tx=tx, shardings=shardings, seed=0)
        step = make_train_step(
            model=model,
            tx=tx,
            num_sources=2,
            state_shardings=shardings,
            mesh=mesh,
            microbatches=microbatches,
        )
        steps = []
        for _ in range(3):  # The same batch thrice: the loss must fall as the model fits it.
            state, metrics = step(state, global_batch(batch, mesh))
            steps.append(jax.device_get(metrics))
        collectives = split_collectives(mesh, microbatches) if microbatches > 1 else []
    return {
        "loss": [float(m["loss_sum"] / m["loss_tokens"]) for m in steps],
        "grad_norm": [float(m["grad_norm"]) for m in steps],
        "source_loss_sum": [m["source_loss_sum"].tolist() for m in steps],
        "source_tokens": [m["source_tokens"].tolist() for m in steps],
        "split_collectives": collectives,
    }


def main() -> None:
    results = []
    for mesh_kwargs in json.loads(sys.argv[1]):
        try:
            results.append(metrics_on(dict(mesh_kwargs)))
        except ValueError as error:  # a ShardingError or another bad value, named
            results.append({"error": str(error)})
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
