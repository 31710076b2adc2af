"""train(): the whole training run, every dependency injected by gin (T5X style)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gin
import jax
import optax
from flax import linen as nn
from jax.sharding import Mesh

from codemix_jax import gin_config, sharding
from codemix_jax.data import MixtureInput
from codemix_jax.metrics import MetricsWriter, Throughput, progress_line
from codemix_jax.model import ModelConfig, Transformer, training_flops_per_token
from codemix_jax.train_state import global_batch, init_train_state, make_train_step, summarize

log = logging.getLogger(__name__)


@gin.configurable(denylist=["run_dir"])
def train(
    *,
    run_dir: str,
    model_config: ModelConfig,
    dataset: MixtureInput,
    mesh: Mesh,
    rules: sharding.Rules,
    learning_rate: optax.Schedule,
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation],
    num_steps: int,
    log_every: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model_config`` on ``dataset`` for ``num_steps`` on ``mesh``; return last metrics.

    Args:
      run_dir: where metrics.jsonl, TensorBoard events and config.gin are written.
      model_config: the transformer's dimensions and variants.
      dataset: the token-share mixture input; its global batch is split over processes.
      mesh: the device mesh; ``rules`` maps logical axis names onto it.
      learning_rate: step -> LR; also logged.
      optimizer: builds the optax transformation from the schedule.
    """
    if dataset.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"dataset seq_len {dataset.seq_len} exceeds "
            f"model max_seq_len {model_config.max_seq_len}"
        )
    sharding.check_batch_divisible(dataset.global_batch_size, mesh)
    model = Transformer(model_config)
    tx = optimizer(learning_rate)
    throughput = Throughput(
        tokens_per_step=dataset.global_batch_size * dataset.seq_len,
        flops_per_token=training_flops_per_token(model_config, dataset.seq_len),
        num_devices=mesh.size,
    )
    batches = dataset.host_batches(
        process_index=jax.process_index(), process_count=jax.process_count()
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, state_shardings = init_train_state(
            model=model, tx=tx, mesh=mesh, rules=rules, seed=seed, seq_len=dataset.seq_len
        )
        train_step = make_train_step(
            model=model,
            tx=tx,
            num_sources=len(dataset.source_names),
            state_shardings=state_shardings,
            mesh=mesh,
        )
        gin_config.write_operative_config(run_dir)
        writer = MetricsWriter(run_dir)
        log.info("training %d steps on mesh %s", num_steps, dict(mesh.shape))
        start_time = time.perf_counter()
        totals = None
        scalars: dict[str, float] = {}
        for step in range(1, num_steps + 1):
            state, metrics = train_step(state, global_batch(next(batches), mesh))
            totals = metrics if totals is None else jax.tree.map(jax.numpy.add, totals, metrics)
            if step == 1:  # Exclude compilation from throughput.
                jax.block_until_ready(totals)
                throughput.reset(step)
            if step % log_every == 0 or step == num_steps:
                scalars = summarize(totals, dataset.source_names)
                scalars["learning_rate"] = float(learning_rate(step - 1))
                scalars.update(throughput.measure(step))
                writer.write(step, scalars)
                log.info(progress_line(step, num_steps, scalars, start_time))
                totals = None
    writer.close()
    return scalars
