"""train(): the whole training run, every dependency injected by gin (T5X style)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gin
import jax
import optax
from flax import linen as nn
from jax.sharding import Mesh

from codemix_jax import gin_config, sharding
from codemix_jax.checkpoint import Checkpoints, checkpoint_dir, run_identity
from codemix_jax.compiled_step import load as load_compiled_step
from codemix_jax.data import MixtureInput
from codemix_jax.eval.validation import Validation, Validator
from codemix_jax.init_from import InitFrom, start_state
from codemix_jax.metrics import IntervalLogger, MetricsWriter, Throughput
from codemix_jax.model import ModelConfig, training_flops_per_token
from codemix_jax.nonfinite import NonFinitePolicy, NonFiniteWatch
from codemix_jax.preemption import watching_signals
from codemix_jax.preflight import check_run_settings
from codemix_jax.train_state import TrainProgram, build_train_program, global_batch
from codemix_jax.watchdog import StepWatchdog

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
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    keep_every: int = 0,
    seed: int = 0,
    microbatches: int = 1,
    compiled_step: str = "",
    init_from: InitFrom | None = None,
    nonfinite: NonFinitePolicy | None = None,
    validation: Validation | None = None,
    watchdog: StepWatchdog | None = None,
) -> dict[str, float]:
    """Train ``model_config`` on ``dataset`` for ``num_steps``; resumes from ``run_dir``.

    Args:
      run_dir: metrics.jsonl, TensorBoard events, config.gin and checkpoints/ go here.
      model_config: the transformer's dimensions and variants.
      dataset: the token-share mixture input; its global batch is split over processes.
      mesh: the device mesh; ``rules`` maps logical axis names onto it.
      learning_rate: step -> LR; also logged.
      optimizer: builds the optax transformation from the schedule.
      checkpoint_every: save params, optimizer and input position every this many steps (and at
        the end); the newest ``keep_checkpoints`` are kept.
      keep_every: also keep for good every checkpoint whose step is a multiple of this (the ones
        a later evaluation reads); 0 = off, else a multiple of ``checkpoint_every``.
      microbatches: take each global batch in this many passes, summing gradients (less
        activation memory, the same update); must divide every host's and device's rows.
      compiled_step: a step saved by `codemix aot --save_compiled` to run instead of compiling
        one; refused, before anything is written, unless it was compiled from this very step.
      init_from: start from another run's checkpoint (a new stage) instead of a fresh init, at
        step 0; ignored once ``run_dir`` has checkpoints of its own (it resumes from those).
      nonfinite: what a step with a NaN/inf loss, gradient or update does (default: stop there).
      validation: when to measure loss and bits per byte on each source's held-out rows.
      watchdog: when a step is named as slow, and when as hung (the process exits).
    Returns the scalars of the last logged step (empty if there was nothing left to train).
    Raises Preempted after saving on SIGTERM/SIGINT (a rerun resumes); DivergedError at a
    non-finite step.
    """
    nonfinite, watchdog = nonfinite or NonFinitePolicy(), watchdog or StepWatchdog()
    check_run_settings(
        run_dir=run_dir,
        model_vocab_size=model_config.vocab_size,
        vocab_path=dataset.vocab_path,
        learning_rate=learning_rate,
        num_steps=num_steps,
        log_every=log_every,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = build_train_program(
            model_config=model_config,
            dataset=dataset,
            mesh=mesh,
            rules=rules,
            learning_rate=learning_rate,
            optimizer=optimizer,
            microbatches=microbatches,
            nonfinite=nonfinite,
        )
        if compiled_step:
            program = load_compiled_step(program, compiled_step)
        batches = dataset.host_batches(
            process_index=jax.process_index(), process_count=jax.process_count()
        )
        checkpoints = Checkpoints(
            checkpoint_dir(run_dir),
            save_every=checkpoint_every,
            keep=keep_checkpoints,
            keep_every=keep_every,
        )
        state, start_step, meta = start_state(
            checkpoints=checkpoints,
            program=program,
            batches=batches,
            meta=run_identity(
                model_config=model_config, input_settings=dataset.stream_settings(), seed=seed
            ),
            seed=seed,
            init_from=init_from,
        )
        gin_config.write_operative_config(run_dir)
        writer = MetricsWriter(run_dir, resume_step=start_step)
        logger = _interval_logger(
            writer=writer,
            program=program,
            dataset=dataset,
            validation=validation,
            learning_rate=learning_rate,
            first_step=start_step + 1,
            num_steps=num_steps,
            log_every=log_every,
        )
        if start_step >= num_steps:
            log.warning("%s already holds step %d; nothing to train", run_dir, start_step)
        log.info("training steps %d..%d on %s", start_step + 1, num_steps, _devices(mesh))
        watch = NonFiniteWatch(nonfinite, last_checkpoint=checkpoints.describe_latest)
        scalars: dict[str, float] = {}
        with checkpoints, writer, watching_signals() as preemption, watchdog.watching() as steps:
            for step in range(start_step + 1, num_steps + 1):
                batch = global_batch(next(batches), mesh)
                state, metrics = steps.run(step, program.step, state, batch)
                watch.check(step, metrics)
                scalars = logger.add(step, metrics, state.params) or scalars
                stopping = preemption.reached(step)
                if stopping or step == num_steps or checkpoints.due(step):
                    watch.flush()  # a non-finite state is never saved
                    checkpoints.save(step, state=state, batches=batches, meta=meta)
                if stopping:
                    raise preemption.stopped(step)
    return scalars


def _devices(mesh: Mesh) -> str:
    """The mesh and the backend it runs on, e.g. ``mesh {'data': 8, ...} of 8 tpu device(s)``."""
    return f"mesh {dict(mesh.shape)} of {mesh.size} {mesh.devices.flat[0].platform} device(s)"


def _interval_logger(
    *,
    writer: MetricsWriter,
    program: TrainProgram,
    dataset: MixtureInput,
    validation: Validation | None,
    learning_rate: optax.Schedule,
    first_step: int,
    num_steps: int,
    log_every: int,
) -> IntervalLogger:
    """Every ``log_every`` steps: losses per source, token shares, LR, phase, throughput, MFU;
    every ``validation.every`` steps: the held-out losses."""
    validator = (
        None if validation is None else Validator(validation, program=program, dataset=dataset)
    )
    return IntervalLogger(
        writer=writer,
        throughput=Throughput(
            tokens_per_step=dataset.global_batch_size * dataset.seq_len,
            flops_per_token=training_flops_per_token(program.model.config, dataset.seq_len),
            num_devices=program.mesh.size,
        ),
        source_names=dataset.source_names,
        learning_rate=learning_rate,
        phase_at=dataset.phase_at,
        first_step=first_step,
        num_steps=num_steps,
        log_every=log_every,
        evaluation=validator,
    )
