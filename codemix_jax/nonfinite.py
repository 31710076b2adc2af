"""Non-finite steps: a loss, gradient norm or update that is NaN or infinite.

A run whose loss has become NaN trains on for nothing and checkpoints garbage. So every step
reports whether it was finite (``nonfinite_steps`` in its metrics), and the loop either stops at
the first such step (the default) or, with ``skip``, the step itself keeps the previous params and
optimizer state and the loop counts it, stopping past ``max_skipped``. A step's state is saved
only once that step is known to be finite.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import gin
import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

NONFINITE = "nonfinite_steps"  # the metric: 1.0 for a step that was not finite


class DivergedError(RuntimeError):
    """The run stopped at a non-finite step; its message names the step and the last checkpoint."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NonFinitePolicy:
    """What a non-finite step does.

    Attributes:
      skip: False (default): the run stops at that step. True: the step's update is dropped in
        the step itself (params and optimizer state stay as they were, its losses are left out of
        the logged means) and counted.
      max_skipped: with ``skip``, the run stops once more than this many steps were skipped.
    """

    skip: bool = False
    max_skipped: int = 10

    def __post_init__(self) -> None:
        if self.max_skipped < 0:
            raise ValueError(f"NonFinitePolicy.max_skipped must be >= 0, got {self.max_skipped}")


def finite_step(loss_sum: jax.Array, grad_norm: jax.Array, updates: object) -> jax.Array:
    """True when the loss, the gradient norm and every update are finite (inside the step).

    Updates are checked element by element: a norm of huge but finite updates would overflow.
    """
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    for update in jax.tree.leaves(updates):
        finite &= jnp.isfinite(update).all()
    return finite


class NonFiniteWatch:
    """Reads each step's flag one step late, so the host never waits on the step it dispatched.

    ``check(step, metrics)`` reads the previous step's flag; ``flush()`` reads the last one now
    (before saving that step's state).
    """

    def __init__(self, policy: NonFinitePolicy, *, last_checkpoint: Callable[[], str]):
        self._policy = policy
        self._last_checkpoint = last_checkpoint
        self._pending: tuple[int, Mapping[str, jax.Array]] | None = None
        self.skipped = 0

    def check(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if float(metrics[NONFINITE]):
            self._handle(step, metrics)

    def _handle(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        if not self._policy.skip:
            loss = float(metrics["loss_sum"] / jnp.maximum(metrics["loss_tokens"], 1.0))
            raise DivergedError(
                f"step {step} is not finite (loss {loss}, gradient norm "
                f"{float(metrics['grad_norm'])}, or an update): stopped there, nothing of it "
                "saved; the last "
                f"checkpoint is {self._last_checkpoint()} (to skip such steps instead: "
                "NonFinitePolicy.skip = True)"
            )
        self.skipped += 1
        if self.skipped > self._policy.max_skipped:
            raise DivergedError(
                f"step {step} is the {self.skipped}th non-finite step skipped, more than "
                f"NonFinitePolicy.max_skipped = {self._policy.max_skipped}: stopped; the last "
                f"checkpoint is {self._last_checkpoint()}"
            )
        log.warning(
            "step %d is not finite: its update was skipped (%d of at most %d)",
            step,
            self.skipped,
            self._policy.max_skipped,
        )
