"""The train state (step, params, optimizer state), its sharded init, and the train step."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codemix_jax import sharding
from codemix_jax.model import Transformer, init_params

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState


def _boxed_state(model: Transformer, tx: optax.GradientTransformation, rng) -> TrainState:
    """Fresh state with ``nn.Partitioned`` boxes kept, so axis names reach the optimizer state."""
    params = init_params(model, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_layout(
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules,
) -> tuple[TrainState, TrainState]:
    """The abstract state (shapes carrying their shardings) and the shardings; allocates nothing.

    A layout error (a dimension that does not divide its mesh axes) surfaces here, before any
    compilation of the real model. The abstract state is also the target a checkpoint restores into.
    """
    boxed = jax.eval_shape(lambda r: _boxed_state(model, tx, r), jax.random.key(0))
    shardings = sharding.logical_to_shardings(boxed, mesh, rules, what="parameter")
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        sharding.unbox_abstract(boxed),
        shardings,
    )
    return abstract, shardings


def init_train_state(
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
) -> TrainState:
    """Fresh params and optimizer state, initialised directly into their shards."""
    init = jax.jit(lambda r: nn.unbox(_boxed_state(model, tx, r)), out_shardings=shardings)
    return init(jax.random.key(seed))


def _token_losses(model: Transformer, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy and the mask of real (non-padding) target tokens."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    return losses * mask, mask


def make_train_step(
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    num_sources: int,
    state_shardings: TrainState,
    mesh: Mesh,
):
    """A jitted, state-donating step returning (new_state, summable metrics).

    Metrics are sums (loss, tokens, per-source loss/tokens) so that the loop can accumulate them on
    device between log steps without forcing a host sync every step.
    """

    def loss_fn(params, batch):
        losses, mask = _token_losses(model, params, batch)
        return losses.sum() / jnp.maximum(mask.sum(), 1.0), (losses, mask)

    def step(state: TrainState, batch: Batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (losses, mask)), grads = grad_fn(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        source = jax.nn.one_hot(batch["source_id"], num_sources, dtype=jnp.float32)
        metrics = {
            "loss_sum": losses.sum(),
            "tokens": mask.sum(),
            "source_loss_sum": source.T @ losses.sum(axis=1),
            "source_tokens": source.T @ mask.sum(axis=1),
            "grad_norm": optax.tree.norm(grads),
            "steps": jnp.ones((), jnp.float32),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def global_batch(host_batch: dict, mesh: Mesh) -> Batch:
    """Assemble each host's rows into global arrays sharded over (data, fsdp)."""
    return {
        name: jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, value.ndim), value
        )
        for name, value in host_batch.items()
    }
