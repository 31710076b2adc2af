"""Gradient accumulation: k microbatches give the whole batch's update, on one device and on meshes;
a microbatch count that does not split every host's and device's rows is refused by name."""

from __future__ import annotations

import gin
import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import AbstractMesh

from codemix_jax import cli, optim, sharding
from codemix_jax.microbatches import check_microbatches
from codemix_jax.model import ModelConfig, Transformer
from codemix_jax.train_state import global_batch, init_train_state, make_train_step, state_layout

CONFIG = ModelConfig(vocab_size=128, d_model=32, num_layers=1, num_heads=4, d_ff=64, max_seq_len=16)
ROWS, LENGTH, SOURCES = 8, 16, 3

LR = 1e-3
# Summing gradients in k parts changes only the order of float32 additions: measured, metrics and
# AdamW moments within 1e-6 of their largest value. A per-microbatch mean or a lost microbatch
# fails it.
RTOL = 1e-5
# Adam's first step moves a param by lr * g / (|g| + eps): where |g| is near eps, rounding noise in
# g moves it by a visible fraction of lr (measured: up to 7e-4 lr here, 4e-3 lr with two layers).
# The moments carry g itself and are held to RTOL.
PARAM_ATOL = 1e-2 * LR


def padded_batch() -> dict[str, np.ndarray]:
    """8 rows of 16 tokens, two documents each; row i ends in 2 * (i % 4) padding tokens, so the
    microbatches of every split hold different numbers of real tokens (a per-microbatch mean
    would weight them wrongly)."""
    rng = np.random.default_rng(0)
    index = np.arange(LENGTH)[None, :]
    real = index < LENGTH - 2 * (np.arange(ROWS)[:, None] % 4)
    split = rng.integers(3, 8, size=(ROWS, 1))
    segment_ids = np.where(real, np.where(index < split, 1, 2), 0)
    positions = np.where(real, np.where(index < split, index, index - split), 0)
    targets = np.where(real, rng.integers(1, CONFIG.vocab_size, (ROWS, LENGTH)), 0)
    inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1))
    source_id = rng.permutation(np.arange(ROWS) % SOURCES)
    batch = dict(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions)
    return {**batch, "source_id": source_id}


def one_step(microbatches: int, chunk_size: int = 0) -> tuple[dict, dict]:
    """(params and optimizer state, metrics) after one AdamW step from the same init and batch."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rules = sharding.logical_axis_rules()
    tx = optim.adamw(optax.constant_schedule(LR))
    model = Transformer(CONFIG)
    gin.bind_parameter("token_losses.chunk_size", chunk_size)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _, shardings = state_layout(model=model, tx=tx, mesh=mesh, rules=rules)
            state = init_train_state(model=model, tx=tx, shardings=shardings, seed=0)
            step = make_train_step(
                model=model,
                tx=tx,
                num_sources=SOURCES,
                state_shardings=shardings,
                mesh=mesh,
                microbatches=microbatches,
            )
            state, metrics = step(state, global_batch(padded_batch(), mesh))
    finally:
        gin.clear_config()
    return jax.device_get(({"params": state.params, "opt_state": state.opt_state}, metrics))


@pytest.fixture(scope="module")
def whole_batch():
    return one_step(1)


@pytest.mark.parametrize(
    ("microbatches", "chunk_size"), [(2, 0), (4, 0), (2, 8)], ids=["k=2", "k=4", "k=2,chunk_size=8"]
)
def test_microbatches_give_the_whole_batch_update(whole_batch, microbatches, chunk_size):
    """New params, AdamW moments and every metric (loss and per-source sums, grad norm) agree."""
    expected_state, expected_metrics = whole_batch
    state, metrics = one_step(microbatches, chunk_size)
    for key in ("loss_tokens", "source_loss_tokens", "source_tokens", "steps"):
        np.testing.assert_array_equal(metrics[key], expected_metrics[key], err_msg=key)
    for key in ("loss_sum", "source_loss_sum", "grad_norm"):
        np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=RTOL, err_msg=key)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, actual), wanted in zip(leaves, jax.tree.leaves(expected_state), strict=True):
        name = jax.tree_util.keystr(path)
        atol = PARAM_ATOL if name.startswith("['params']") else RTOL * np.abs(wanted).max()
        np.testing.assert_allclose(actual, wanted, rtol=RTOL, atol=atol, err_msg=name)


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


@pytest.mark.parametrize(
    ("microbatches", "process_count", "mesh", "named"),
    [
        (3, 1, (1, 1, 1), "train.microbatches=3 does not divide the per-host batch 8"),
        (4, 4, (1, 4, 1), r"per-host batch 2 \(global batch 8 over 4 processes\)"),
        (2, 1, (2, 4, 1), r"per-device batch 1 \(global batch 8 over data\*fsdp = 8 devices\)"),
        (0, 1, (1, 1, 1), "train.microbatches=0 must be at least 1"),
    ],
    ids=["host", "hosts", "device", "zero"],
)
def test_microbatches_that_do_not_split_the_rows_are_refused(
    microbatches, process_count, mesh, named
):
    with pytest.raises(ValueError, match=named):
        check_microbatches(
            microbatches=microbatches,
            global_batch_size=ROWS,
            mesh=abstract_mesh(*mesh),
            process_count=process_count,
        )


def test_microbatches_that_divide_are_accepted():
    check_microbatches(
        microbatches=4, global_batch_size=32, mesh=abstract_mesh(2, 2, 2), process_count=2
    )


def test_train_refuses_bad_microbatches_before_reading_data(tmp_path, caplog, local_data):
    """The CLI stops with status 2 and the message, before any data is read or compiled."""
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 100",
        "MixtureInput.global_batch_size = 8",
        "train.microbatches = 3",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    argv = ["train", "--gin_file", "gin/experiments/smoke.gin", "--run_dir", str(tmp_path), *flags]
    assert cli.main(argv) == 2
    assert "train.microbatches=3 does not divide the per-host batch 8" in caplog.text
    assert not (tmp_path / "metrics.jsonl").exists()


# On 8-device meshes (data/fsdp/tensor, the chunked loss, a per-device split refused by name):
# test_sharding.test_microbatches_and_chunked_loss_on_8_device_meshes, which shares that file's
# mesh subprocess.
