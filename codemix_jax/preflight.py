"""Settings checked before anything is compiled or written.

Each of these once cost a whole run: a model vocabulary smaller than the tokenizer's trains to NaN
from the first step, a negative learning rate climbs the loss without a word, and a run dir that
cannot be written ends in a traceback after the compile. Every check raises ``ValueError`` naming
the bad value (the CLI's exit 2) and writes nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codemix_jax.data.vocab import load_vocab

log = logging.getLogger(__name__)


def check_run_settings(
    *,
    run_dir: str,
    model_vocab_size: int,
    vocab_path: str,
    learning_rate: optax.Schedule,
    num_steps: int,
    log_every: int,
) -> None:
    """All of this module's checks, cheapest first."""
    for name, value in (("train.num_steps", num_steps), ("train.log_every", log_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    check_vocab(model_vocab_size, vocab_path)
    check_schedule(learning_rate, num_steps)
    check_writable(run_dir)


def check_vocab(model_vocab_size: int, vocab_path: str) -> None:
    """The model must have an embedding row for every id the tokenizer can produce."""
    tokenizer_size = load_vocab(vocab_path).vocab_size
    if model_vocab_size < tokenizer_size:
        raise ValueError(
            f"ModelConfig.vocab_size = {model_vocab_size} is smaller than the vocabulary "
            f"{vocab_path!r} ({tokenizer_size} ids): ids past the embedding would train to NaN"
        )
    if model_vocab_size > tokenizer_size:
        log.info(
            "ModelConfig.vocab_size %d > the tokenizer's %d ids (padding rows, never seen)",
            model_vocab_size,
            tokenizer_size,
        )


def check_schedule(learning_rate: optax.Schedule, num_steps: int) -> None:
    """Finite and non-negative at every step of the run, and done warming up by its end.

    Step ``s`` (from 1) trains at ``learning_rate(s - 1)``. Rising into the last step and past it
    is a warmup longer than the run (a one-step run, e.g. a check at LR 0, cannot tell).
    """
    lrs = np.asarray(jax.jit(jax.vmap(learning_rate))(jnp.arange(num_steps + 1)))
    used = lrs[:num_steps]
    for bad, what in ((~np.isfinite(used), "not finite"), (used < 0, "negative")):
        if bad.any():
            step = int(np.argmax(bad))
            raise ValueError(
                f"the learning rate schedule is {what} at step {step + 1}: {used[step]} "
                "(check its peak, final and warmup settings)"
            )
    if num_steps > 1 and lrs[num_steps] > used[-1] > used[-2]:
        raise ValueError(
            f"the learning rate still rises at the last step {num_steps} ({used[-1]:.3g}): its "
            "warmup is longer than the run (train.num_steps)"
        )


def check_writable(run_dir: str) -> None:
    """The run dir can be made and written: no file in its way, no read-only place.

    Tried for real (permission bits do not tell root, or a read-only mount, the truth) in the
    nearest existing ancestor, with a directory removed at once. Remote paths (gs://) are left to
    the first write.
    """
    if "://" in run_dir:
        return
    path = os.path.abspath(run_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"cannot create run dir {run_dir!r}: {path!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".codemix-write-test-", dir=path))
    except OSError as error:
        raise ValueError(
            f"cannot write run dir {run_dir!r} in {path!r}: {error.strerror}"
        ) from None
