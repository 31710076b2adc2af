"""Gradient accumulation: one step's global batch taken in ``k`` microbatches, one at a time.

Paper A's batch of 512 rows of 8192 tokens does not fit a small slice's memory in one pass; in
``k`` passes each holds the activations of ``1/k`` of the rows, and the gradients are summed.

A microbatch takes ``1/k`` of every device's own rows: row ``r`` of the global batch goes to
microbatch ``r % k``. Each device holds a contiguous block of rows, whose length ``k`` divides, so
``[B, ...] -> [B / k, k, ...] -> [k, B / k, ...]`` is a local reshape and transpose: no row moves
between devices and every microbatch stays sharded over (data, fsdp).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codemix_jax.sharding import BATCH_AXES

Batch = dict[str, jax.Array]
GradFn = Callable[[Batch], tuple[Any, dict[str, jax.Array]]]


def check_microbatches(
    *, microbatches: int, global_batch_size: int, mesh: Mesh, process_count: int
) -> None:
    """Refuse, naming the values, a ``microbatches`` that does not split every host's and every
    device's rows evenly (a device would otherwise have to take rows from another)."""
    if microbatches < 1:
        raise ValueError(f"train.microbatches={microbatches} must be at least 1")
    per_host = global_batch_size // process_count
    if per_host % microbatches:
        raise ValueError(
            f"train.microbatches={microbatches} does not divide the per-host batch {per_host} "
            f"(global batch {global_batch_size} over {process_count} processes)"
        )
    batch_devices = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    per_device = global_batch_size // batch_devices
    if per_device % microbatches:
        raise ValueError(
            f"train.microbatches={microbatches} does not divide the per-device batch {per_device} "
            f"(global batch {global_batch_size} over data*fsdp = {batch_devices} devices)"
        )


def split_microbatches(batch: Batch, *, microbatches: int, mesh: Mesh) -> Batch:
    """``[B, ...] -> [k, B / k, ...]``: microbatch ``j`` holds rows ``j, j + k, j + 2k, ...``."""

    def split(x: jax.Array) -> jax.Array:
        rows = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            rows, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
        )

    return jax.tree.map(split, batch)


def accumulate_gradients(
    grad_fn: GradFn, batch: Batch, *, microbatches: int, mesh: Mesh, grad_shardings: Any
) -> tuple[Any, dict[str, jax.Array]]:
    """``grad_fn``'s (gradients, metric sums) summed over ``microbatches`` slices of ``batch``.

    ``grad_fn`` must return gradients of a sum normalised by the whole batch (not by its slice),
    so that the slices' gradients add up to the whole batch's. They are summed in float32, laid
    out like the params (each slice's gradient is reduce-scattered into the running sum), and
    cast to the params' dtype once. One microbatch runs the step exactly as without accumulation.
    """
    check_microbatches(
        microbatches=microbatches,
        global_batch_size=jax.tree.leaves(batch)[0].shape[0],
        mesh=mesh,
        process_count=jax.process_count(),
    )
    if microbatches == 1:
        return grad_fn(batch)
    slices = split_microbatches(batch, microbatches=microbatches, mesh=mesh)
    grads_like, sums_like = jax.eval_shape(grad_fn, jax.tree.map(lambda x: x[0], slices))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (grads_like, sums_like))
    start = (jax.lax.with_sharding_constraint(zeros[0], grad_shardings), zeros[1])

    def add(total, microbatch: Batch):
        return jax.tree.map(jnp.add, total, grad_fn(microbatch)), None

    (grads, sums), _ = jax.lax.scan(add, start, slices)
    return jax.tree.map(lambda g, like: g.astype(like.dtype), grads, grads_like), sums
