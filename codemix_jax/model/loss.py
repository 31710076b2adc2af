"""Per-token next-token cross entropy: the reference on full logits, and a chunked form that never
holds them.

At paper A's scale (256K vocabulary, 8192 tokens per row) the float32 logits ``[b, l, vocab]`` are
the train step's largest buffer, several copies live at once. The chunked form takes the model's
final hidden states and output projection instead (``Transformer(head=False)``), projects
``chunk_size`` positions of every row at a time, and in the backward pass recomputes each chunk's
logits from the saved hidden states and log-normalizers rather than keeping them: only a few
buffers the size of one chunk's logits ``[b, chunk_size, vocab]`` are live, however long the row.

Chunks run along the sequence axis so that the batch axis keeps its (data, fsdp) sharding and the
vocabulary axis its ``tensor`` sharding inside every chunk: no rows move between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from codemix_jax.model.layers import BATCH_LENGTH, constrain, matmul, vocab_logits
from codemix_jax.model.transformer import Transformer

TokenLosses = Callable[[Transformer, Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]

CHUNKS = (None, *BATCH_LENGTH)  # [num_chunks, b, chunk_size]: only the batch axis is sharded
KERNEL = ("activation_embed", "activation_vocab")  # [d_model, vocab], gathered over fsdp once


@gin.configurable
def token_losses(*, chunk_size: int = 0) -> TokenLosses:
    """The train step's loss: ``(model, params, batch) -> (losses [b, l], mask [b, l])``.

    ``losses`` is each target token's cross entropy times its weight; ``mask`` is that weight
    (``loss_weights``): 0 on padding and on an instruction example's prompt, 1 elsewhere. Per row
    they sum to the per-source loss sums.

    Args:
      chunk_size: 0 = the reference, full float32 logits and optax's cross entropy; N > 0 = N
        positions of every row at a time (``chunked_cross_entropy``); N must divide a longer
        sequence, and a shorter one is one chunk (a TPU file's 1024 serves a seq-128 smoke run).
    """
    if chunk_size < 0:
        raise ValueError(
            f"token_losses.chunk_size={chunk_size} must be 0 (full logits) or positive"
        )

    def losses(model: Transformer, params: Any, batch: dict[str, jax.Array]):
        inputs = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
        variables = {"params": params}
        if chunk_size:
            hidden, kernel = model.apply(variables, batch["inputs"], **inputs, head=False)
            per_token = chunked_cross_entropy(
                hidden, kernel, batch["targets"], chunk_size=chunk_size
            )
        else:
            logits = model.apply(variables, batch["inputs"], **inputs)
            per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = loss_weights(batch)
        return per_token * mask, mask

    return losses


def real_targets(batch: dict[str, jax.Array]) -> jax.Array:
    """``[b, l]`` 1.0 where the target is a real token, 0.0 on padding (``segment_ids == 0``)."""
    return (batch["segment_ids"] > 0).astype(jnp.float32)


def loss_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """``[b, l]`` float32 weight of each target's loss: the batch's ``loss_weights`` (1 on an
    instruction example's response and EOS, 0 on its prompt; 1 on documents) on real targets.
    A batch without them (built by hand) weighs every real target."""
    if "loss_weights" not in batch:
        return real_targets(batch)
    return real_targets(batch) * batch["loss_weights"].astype(jnp.float32)


def chunked_cross_entropy(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk_size: int
) -> jax.Array:
    """Float32 cross entropy ``[b, l]`` of ``hidden [b, l, d] @ kernel [d, vocab]`` against
    ``targets [b, l]``, ``chunk_size`` positions of every row at a time.

    Rounds as the full-logits head does: the kernel is cast to the hidden states' dtype and each
    chunk's logits are accumulated in float32 (``vocab_logits``). The kernel's gradient is summed
    over chunks in float32 and cast to its dtype once, as one full-size matmul would. A row no
    longer than ``chunk_size`` is one chunk.
    """
    length = hidden.shape[1]
    chunk_size = min(chunk_size, length)
    if length % chunk_size:
        raise ValueError(
            f"token_losses.chunk_size={chunk_size} does not divide the sequence length {length}"
        )
    kernel = constrain(kernel.astype(hidden.dtype), *KERNEL)
    losses = _chunk_losses(
        _to_chunks(hidden, chunk_size, "activation_embed"), kernel, _to_chunks(targets, chunk_size)
    )
    return _from_chunks(losses)


def _to_chunks(x: jax.Array, chunk_size: int, *names: str) -> jax.Array:
    """``[b, l, ...] -> [l / chunk_size, b, chunk_size, ...]``; batch sharding untouched."""
    b, length, *rest = x.shape
    chunks = x.reshape(b, length // chunk_size, chunk_size, *rest).swapaxes(0, 1)
    return constrain(chunks, *CHUNKS, *names)


def _from_chunks(x: jax.Array) -> jax.Array:
    """Inverse of ``_to_chunks``: ``[n, b, c, ...] -> [b, n * c, ...]``."""
    n, b, c, *rest = x.shape
    return x.swapaxes(0, 1).reshape(b, n * c, *rest)


def _rows(x: jax.Array) -> jax.Array:
    """``[b, c, n] -> [b * c, n]``: every position one row of a 2-D matmul."""
    return x.reshape(-1, x.shape[-1])


def _logits(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    """One chunk's float32 logits ``[b, c, vocab]``, vocab sharded like the full logits."""
    return constrain(vocab_logits(hidden, kernel), *BATCH_LENGTH, "activation_vocab")


def _is_target(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``[b, c, vocab]`` True at each token's target: a compare, local on a sharded vocabulary
    (where a gather of the target column would need the whole row)."""
    return jnp.arange(logits.shape[-1]) == targets[..., None]


@jax.custom_vjp
def _chunk_losses(hidden: jax.Array, kernel: jax.Array, targets: jax.Array) -> jax.Array:
    """``[n, b, c]`` losses of ``hidden [n, b, c, d]`` (chunks first); gradient below."""
    return _forward(hidden, kernel, targets)[0]


def _forward(hidden: jax.Array, kernel: jax.Array, targets: jax.Array):
    """Losses chunk by chunk, keeping only the inputs and each token's log-normalizer."""

    def chunk(_, xs):
        h, t = xs
        logits = _logits(h, kernel)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.where(_is_target(logits, t), logits, 0.0).sum(axis=-1)
        return None, (log_normalizer - target_logit, log_normalizer)

    _, (losses, log_normalizers) = jax.lax.scan(chunk, None, (hidden, targets))
    return losses, (hidden, kernel, targets, log_normalizers)


def _backward(residuals, losses_grad: jax.Array):
    """Recompute each chunk's logits; d loss / d logits = softmax - one_hot(target)."""
    hidden, kernel, targets, log_normalizers = residuals

    def chunk(kernel_grad, xs):
        h, t, log_normalizer, g = xs
        logits = _logits(h, kernel)
        probs = jnp.exp(logits - log_normalizer[..., None])
        logits_grad = (probs - _is_target(logits, t)) * g[..., None]
        logits_grad = constrain(logits_grad, *BATCH_LENGTH, "activation_vocab")
        h_grad = matmul(logits_grad, kernel.T, preferred_element_type=jnp.float32)
        kernel_grad += matmul(_rows(h).T, _rows(logits_grad), preferred_element_type=jnp.float32)
        return kernel_grad, h_grad.astype(h.dtype)

    zeros = constrain(jnp.zeros(kernel.shape, jnp.float32), *KERNEL)
    xs = (hidden, targets, log_normalizers, losses_grad)
    kernel_grad, hidden_grad = jax.lax.scan(chunk, zeros, xs)
    return hidden_grad, kernel_grad.astype(kernel.dtype), None


_chunk_losses.defvjp(_forward, _backward)
