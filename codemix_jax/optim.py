"""Learning-rate schedules and the AdamW optimizer, all selectable from gin.

Schedules are plain ``step -> learning rate`` functions (optax schedules), so the train loop
can both feed them to the optimizer and log the value it used.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import optax

from codemix_jax.model.param_count import EMBEDDING_MODULES

NO_DECAY_NAMES = ("scale", "bias")


@gin.configurable
def warmup_cosine(
    *, peak: float, warmup_steps: int, total_steps: int, final: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak``, then cosine decay to ``final`` at ``total_steps``."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps={warmup_steps} < total_steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=final,
    )


@gin.configurable
def warmup_stable_decay(
    *,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.2,
    final: float = 0.0,
) -> optax.Schedule:
    """WSD: linear warmup, constant ``peak``, then linear decay to ``final`` at the end."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    decay_steps = max(1, round(total_steps * decay_fraction))
    stable_steps = total_steps - warmup_steps - decay_steps
    if stable_steps < 0:
        raise ValueError(
            f"warmup_steps={warmup_steps} + decay steps {decay_steps} "
            f"exceed total_steps={total_steps}"
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warmup_steps),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, final, decay_steps),
        ],
        boundaries=[warmup_steps, warmup_steps + stable_steps],
    )


@gin.configurable
def warmup_constant(*, peak: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then ``peak`` for good: WSD's warmup and stable phases as a stage of
    their own, whose decay is a ``linear_anneal`` stage started from this one's last LR."""
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
        boundaries=[warmup_steps],
    )


@gin.configurable
def linear_anneal(*, start: float, total_steps: int, final: float = 1e-6) -> optax.Schedule:
    """Cooldown: linear from ``start`` (the previous stage's last LR) at the first step to
    ``final`` at the last (``total_steps - 1``): the run both starts and ends at the given LRs."""
    if total_steps < 1:
        raise ValueError(f"linear_anneal needs total_steps >= 1, got {total_steps}")
    return optax.linear_schedule(start, final, max(total_steps - 1, 1))


@gin.configurable
def rsqrt(*, peak: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup, then ``peak * sqrt(warmup_steps / step)`` (T5-style inverse square root)."""
    if warmup_steps < 1:
        raise ValueError(f"rsqrt needs warmup_steps >= 1, got {warmup_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / warmup_steps
        decay = peak * jnp.sqrt(warmup_steps / jnp.maximum(step, 1.0))
        return jnp.where(step < warmup_steps, warm, decay)

    return schedule


def weight_decay_mask(params, *, decay_embeddings: bool = True):
    """True where weight decay applies: not on norms or biases, optionally not on embeddings."""
    excluded = NO_DECAY_NAMES + (() if decay_embeddings else EMBEDDING_MODULES)

    def decays(path, _) -> bool:
        names = {getattr(key, "key", None) for key in path}
        return not names.intersection(excluded)

    return jax.tree_util.tree_map_with_path(decays, params)


@gin.configurable
def adamw(
    learning_rate: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    decay_embeddings: bool = True,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a name-based weight-decay mask."""
    _check_adamw(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm)
    clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(
        *clip,
        optax.adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mask=lambda params: weight_decay_mask(params, decay_embeddings=decay_embeddings),
        ),
    )


def _check_adamw(
    *, b1: float, b2: float, eps: float, weight_decay: float, clip_norm: float | None
) -> None:
    """Values that would train on silently into nonsense (b2 = 1 never forgets, a negative decay
    grows the weights) are refused by name."""
    for name, value, ok, wanted in (
        ("b1", b1, 0 <= b1 < 1, "in [0, 1)"),
        ("b2", b2, 0 <= b2 < 1, "in [0, 1)"),
        ("eps", eps, eps > 0, "> 0"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ("clip_norm", clip_norm, clip_norm is None or clip_norm > 0, "> 0, or None: no clipping"),
    ):
        if not ok:
            raise ValueError(f"adamw.{name} = {value} must be {wanted}")
