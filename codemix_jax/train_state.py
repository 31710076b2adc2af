"""The train state (step, params, optimizer state), its sharded init, and the train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codemix_jax import sharding
from codemix_jax.data import MixtureInput
from codemix_jax.microbatches import accumulate_gradients, check_microbatches
from codemix_jax.model import ModelConfig, Transformer, init_params
from codemix_jax.model.attention import check_attention
from codemix_jax.model.loss import loss_weights, real_targets, token_losses
from codemix_jax.nonfinite import NONFINITE, NonFinitePolicy, finite_step

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
    # The key is made inside eval_shape: an eager one would need a device that can run code,
    # which compile-only TPU devices (`codemix aot`) are not.
    boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0)))
    return sharding.sharded_abstract(boxed, mesh, rules, what="parameter")


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


def stage_start_state(
    *,
    params: Any,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    opt_state: optax.OptState | None = None,
) -> TrainState:
    """Step 0 around ``params`` taken from another run: the start of a new training stage.

    Without ``opt_state`` the optimizer starts fresh. With it (the other run's), the moments and
    Adam's bias-correction count carry over, but every LR schedule counter restarts at 0: the new
    stage runs its own schedule from its own step 0, the LR the loop logs. The inputs are donated.
    """

    def start(params, opt_state):
        opt_state = tx.init(params) if opt_state is None else _restart_schedules(opt_state)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    return jax.jit(start, out_shardings=shardings, donate_argnums=(0, 1))(params, opt_state)


def _restart_schedules(opt_state: optax.OptState) -> optax.OptState:
    def is_schedule(node) -> bool:
        return isinstance(node, optax.ScaleByScheduleState)

    return jax.tree.map(
        lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node) else node,
        opt_state,
        is_leaf=is_schedule,
    )


def make_train_step(
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    num_sources: int,
    state_shardings: TrainState,
    mesh: Mesh,
    microbatches: int = 1,
    skip_nonfinite: bool = False,
):
    """A jitted, state-donating step returning (new_state, summable metrics).

    The loss is gin's ``token_losses`` (full or chunked logits), averaged over the weighted target
    tokens of the global batch (``loss_weights``: every real token of a document, the response
    tokens of an instruction example), which may be taken in ``microbatches`` passes
    (``microbatches.py``): the update is the same either way.

    Metrics are sums so that the loop can accumulate them on device between log steps without
    forcing a host sync every step: the loss and its weighted token count, overall and per source
    (``loss_sum``, ``loss_tokens``, ``source_loss_sum``, ``source_loss_tokens``), and each
    source's real tokens, prompts included (``source_tokens``: the mixture's token shares), and
    whether the step was not finite (``nonfinite.py``; with ``skip_nonfinite`` it changed nothing).
    """
    losses_fn = token_losses()

    def slice_grads(params, batch: Batch, num_tokens: jax.Array):
        """Gradients of a slice's loss sum over the whole batch's token count, and its sums."""

        def loss_fn(params):
            losses, mask = losses_fn(model, params, batch)
            return losses.sum() / num_tokens, (losses, mask)

        (_, (losses, mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        source = jax.nn.one_hot(batch["source_id"], num_sources, dtype=jnp.float32)
        return grads, {
            "loss_sum": losses.sum(),
            "loss_tokens": mask.sum(),
            "source_loss_sum": source.T @ losses.sum(axis=1),
            "source_loss_tokens": source.T @ mask.sum(axis=1),
            "source_tokens": source.T @ real_targets(batch).sum(axis=1),
        }

    def step(state: TrainState, batch: Batch):
        num_tokens = jnp.maximum(loss_weights(batch).sum(), 1.0)  # of the whole batch
        grads, sums = accumulate_gradients(
            lambda rows: slice_grads(state.params, rows, num_tokens),
            batch,
            microbatches=microbatches,
            mesh=mesh,
            grad_shardings=state_shardings.params,
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**sums, "grad_norm": optax.tree.norm(grads), "steps": jnp.ones((), jnp.float32)}
        finite = finite_step(sums["loss_sum"], metrics["grad_norm"], updates)
        if skip_nonfinite:  # keep the old state, leave the step out of the logged means
            params, opt_state, metrics = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state, metrics),
                (state.params, state.opt_state, jax.tree.map(jnp.zeros_like, metrics)),
            )
        metrics[NONFINITE] = 1.0 - finite.astype(jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def abstract_batch(dataset: MixtureInput, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step is fed (see ``global_batch``): shapes, dtypes, shardings only."""
    rows, length = dataset.global_batch_size, dataset.seq_len
    shapes = {
        "inputs": (rows, length),
        "targets": (rows, length),
        "segment_ids": (rows, length),
        "positions": (rows, length),
        "loss_weights": (rows, length),
        "source_id": (rows,),
    }
    return {
        name: jax.ShapeDtypeStruct(
            shape, jnp.int32, sharding=sharding.batch_sharding(mesh, len(shape))
        )
        for name, shape in shapes.items()
    }


def global_batch(host_batch: dict, mesh: Mesh) -> Batch:
    """Assemble each host's rows into global arrays sharded over (data, fsdp)."""
    return {
        name: jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, value.ndim), value
        )
        for name, value in host_batch.items()
    }


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What a run compiles, built once for `codemix train` and `codemix aot` alike."""

    model: Transformer
    tx: optax.GradientTransformation
    mesh: Mesh
    abstract_state: TrainState  # shapes with shardings: the target a checkpoint restores into
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    shardings: TrainState
    step: Callable  # jitted (state, batch) -> (state, metric sums), or a loaded executable

    def lower(self) -> jax.stages.Lowered:
        """The step traced for the run's abstract state and batch; nothing is compiled."""
        return self.step.lower(self.abstract_state, self.abstract_batch)


def build_train_program(
    *,
    model_config: ModelConfig,
    dataset: MixtureInput,
    mesh: Mesh,
    rules: sharding.Rules,
    learning_rate: optax.Schedule,
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation],
    microbatches: int = 1,
    nonfinite: NonFinitePolicy | None = None,
) -> TrainProgram:
    """Check the settings against each other and the mesh, then lay out and build the step.

    Call inside ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``. Nothing is compiled
    or allocated, so every error here comes before the first batch is read.
    """
    _check_compatible(model_config, dataset, mesh, microbatches)
    model = Transformer(model_config)
    tx = optimizer(learning_rate)
    abstract_state, shardings = state_layout(model=model, tx=tx, mesh=mesh, rules=rules)
    step = make_train_step(
        model=model,
        tx=tx,
        num_sources=len(dataset.source_names),
        state_shardings=shardings,
        mesh=mesh,
        microbatches=microbatches,
        skip_nonfinite=(nonfinite or NonFinitePolicy()).skip,
    )
    batch = abstract_batch(dataset, mesh)
    return TrainProgram(model, tx, mesh, abstract_state, batch, shardings, step)


def _check_compatible(
    model_config: ModelConfig, dataset: MixtureInput, mesh: Mesh, microbatches: int
) -> None:
    if dataset.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"dataset seq_len {dataset.seq_len} exceeds "
            f"model max_seq_len {model_config.max_seq_len}"
        )
    check_attention(model_config.attention, mesh.devices.flat[0].platform, dataset.seq_len)
    sharding.check_batch_divisible(dataset.global_batch_size, mesh)
    check_microbatches(
        microbatches=microbatches,
        global_batch_size=dataset.global_batch_size,
        mesh=mesh,
        process_count=jax.process_count(),
    )
