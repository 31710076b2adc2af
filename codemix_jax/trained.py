"""A trained model read back from a run directory: what sampling, evaluation and export start from.

A checkpoint carries the model's settings (its meta) but not the vocabulary's location, which the
run's operative config (``config.gin``) records; both are read here so that an evaluation needs
nothing but the run directory and, optionally, a step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import gin
import jax
from gin import config_parser
from jax.sharding import Mesh

from codemix_jax import sharding
from codemix_jax.checkpoint import SavedRun, checkpoint_dir
from codemix_jax.gin_config import REPO_ROOT
from codemix_jax.model import ModelConfig, Transformer, init_params
from codemix_jax.model.attention import REQUIRED_PLATFORM

log = logging.getLogger(__name__)


class TrainedModelError(ValueError):
    """A run directory, step or vocabulary that cannot be read back as a trained model."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A checkpoint's params on a mesh, with what an evaluation record says about them."""

    run_dir: str
    step: int
    config: ModelConfig
    params: Any  # unboxed, laid out on ``mesh`` by ``rules`` as in training
    vocab_path: str
    tokens_seen: int  # this run's tokens up to ``step`` (a stage counts from its own step 0)
    mesh: Mesh
    rules: sharding.Rules

    @property
    def model(self) -> Transformer:
        return Transformer(self.config)


def saved_run(run_dir: str) -> SavedRun:
    """The run's checkpoints, read only; refused, by path, where there are none."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        raise TrainedModelError(f"{run_dir!r} has no checkpoints/ folder: is it a run directory?")
    return SavedRun(directory)


def pick_step(run: SavedRun, step: int | None) -> int:
    """``step``, or the newest when None; a step that was not saved is refused with those that
    were."""
    steps = run.steps()
    if not steps:
        raise TrainedModelError(f"{run.directory} holds no finished checkpoint")
    if step is None:
        return max(steps)
    if step not in steps:
        raise TrainedModelError(f"{run.directory} has no checkpoint at step {step}; it has {steps}")
    return step


def saved_config(run: SavedRun, step: int) -> ModelConfig:
    """The ModelConfig the checkpoint at ``step`` was trained with."""
    return ModelConfig(**run.meta(step)["ModelConfig"])


def run_vocab_path(run_dir: str) -> str:
    """The vocabulary the run trained with, from its ``config.gin``; a relative path is tried
    against the working directory, then the repository (where `make data` puts it)."""
    config_path = os.path.join(run_dir, "config.gin")
    if not os.path.exists(config_path):
        raise TrainedModelError(f"{config_path} not found: pass the vocabulary with --vocab_path")
    path = _bound_value(config_path, "MixtureInput", "vocab_path")
    if path is None:
        raise TrainedModelError(f"{config_path} names no MixtureInput.vocab_path")
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.exists(candidate):
            return candidate
    raise TrainedModelError(f"the run's vocabulary {path!r} (from {config_path}) does not exist")


def _bound_value(config_path: str, selector: str, name: str) -> Any:
    """The value ``config_path`` binds to ``selector.name`` (read by gin's own parser: it wraps
    long values onto a second line), or None."""
    with open(config_path) as f:
        parser = config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True))
        for statement in parser:
            if isinstance(statement, config_parser.BindingStatement) and (
                statement.selector,
                statement.arg_name,
            ) == (selector, name):
                return statement.value
    return None


def runnable_here(config: ModelConfig, platform: str) -> ModelConfig:
    """``config`` with its attention kernel replaced by the reference where ``platform`` cannot run
    it: the same function (model/attention.py), so a TPU-trained model evaluates on a CPU."""
    if REQUIRED_PLATFORM[config.attention] in (None, platform):
        return config
    log.info("attention %r needs another platform; evaluating with 'xla'", config.attention)
    return dataclasses.replace(config, attention="xla")


def load_trained(
    run_dir: str,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
    vocab_path: str | None = None,
) -> TrainedModel:
    """The params of ``run_dir``'s checkpoint at ``step`` (default: the newest), restored straight
    into their shards on ``mesh`` (default: every device on the fsdp axis)."""
    run = saved_run(run_dir)
    step = pick_step(run, step)
    mesh = mesh or sharding.make_mesh()
    meta = run.meta(step)
    config = runnable_here(ModelConfig(**meta["ModelConfig"]), mesh.devices.flat[0].platform)
    boxed = jax.eval_shape(lambda: init_params(Transformer(config), jax.random.key(0)))
    abstract, _ = sharding.sharded_abstract(boxed, mesh, rules, what="parameter")
    params = run.restore_state(step, {"params": abstract})["params"]
    stream = meta["MixtureInput"]
    log.info("loaded %s step %d", run.directory, step)
    return TrainedModel(
        run_dir=os.path.abspath(run_dir),
        step=step,
        config=config,
        params=params,
        vocab_path=vocab_path or run_vocab_path(run_dir),
        tokens_seen=step * stream["global_batch_size"] * stream["seq_len"],
        mesh=mesh,
        rules=rules,
    )
