"""Chunked cross entropy against the full-logits reference: losses, gradients, errors, memory."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from codemix_jax.model import ModelConfig, Transformer, init_params
from codemix_jax.model.layers import vocab_logits
from codemix_jax.model.loss import chunked_cross_entropy, token_losses

LENGTH = 16
CONFIG = ModelConfig(
    vocab_size=96, d_model=32, num_layers=1, num_heads=4, d_ff=64, max_seq_len=LENGTH
)


def expected_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Cross entropy written from its definition: -log softmax(logits)[target], times weights."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0] * weights


def relative_error(actual, expected) -> float:
    actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("chunk_size", [4, 16], ids=["4_chunks", "one_chunk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_cross_entropy_matches_full_logits(dtype, chunk_size):
    """Losses and gradients w.r.t. the hidden states and the kernel, with a weight per token.

    The kernel is float32 (the param dtype) and the hidden states in the compute dtype: logits are
    multiplied in that dtype with float32 accumulation, as the full-logits head does, so even in
    bfloat16 the losses agree to float32 rounding (logits rounded to bfloat16 would be ~1e-3 off).
    """
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, LENGTH, 8)), dtype)
    kernel = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, LENGTH)))
    weights = jnp.asarray(rng.random((2, LENGTH)), jnp.float32)

    def reference(hidden, kernel):
        return expected_losses(vocab_logits(hidden, kernel), targets, weights)

    def chunked(hidden, kernel):
        return chunked_cross_entropy(hidden, kernel, targets, chunk_size=chunk_size) * weights

    def value_and_grads(losses):
        return jax.jit(jax.value_and_grad(lambda *a: losses(*a).sum(), argnums=(0, 1)))

    np.testing.assert_allclose(
        jax.jit(chunked)(hidden, kernel), reference(hidden, kernel), rtol=1e-6, atol=1e-6
    )
    _, (hidden_grad, kernel_grad) = value_and_grads(chunked)(hidden, kernel)
    _, (expected_hidden_grad, expected_kernel_grad) = value_and_grads(reference)(hidden, kernel)
    assert (hidden_grad.dtype, kernel_grad.dtype) == (hidden.dtype, kernel.dtype)
    tolerance = 1e-2 if dtype == "bfloat16" else 1e-6  # bfloat16 hidden gradients: one rounding
    assert relative_error(hidden_grad, expected_hidden_grad) < tolerance
    assert relative_error(kernel_grad, expected_kernel_grad) < tolerance


@functools.cache
def params_of(config: ModelConfig) -> dict:
    return nn.unbox(jax.jit(lambda r: init_params(Transformer(config), r))(jax.random.key(0)))


def padded_batch() -> dict[str, jax.Array]:
    """Two rows of LENGTH tokens: row 0 packs documents of 9 and 7; row 1 has 11 real tokens of
    one document, then 5 of padding."""
    rng = np.random.default_rng(1)
    index = np.arange(LENGTH)
    segment_ids = np.stack([np.where(index < 9, 1, 2), np.where(index < 11, 1, 0)])
    positions = np.stack([np.where(index < 9, index, index - 9), np.where(index < 11, index, 0)])
    targets = rng.integers(1, CONFIG.vocab_size, (2, LENGTH)) * (segment_ids > 0)
    inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1))
    batch = dict(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions)
    return {name: jnp.asarray(value, jnp.int32) for name, value in batch.items()}


def mean_loss(losses_fn, model: Transformer, params, batch) -> jax.Array:
    """What the train step minimises: summed token losses over the number of real tokens."""
    losses, mask = losses_fn(model, params, batch)
    return losses.sum() / mask.sum()


@functools.cache
def expected_for(config: ModelConfig) -> tuple[jax.Array, jax.Array, dict]:
    """Per-token losses, mean loss and its gradients from the model's full logits, padding masked,
    written out here."""
    model, batch = Transformer(config), padded_batch()
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)

    def losses(params):
        logits = model.apply(
            {"params": params},
            batch["inputs"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
        )
        return expected_losses(logits, batch["targets"], mask)

    def mean(params):
        return losses(params).sum() / mask.sum()

    params = params_of(config)
    return (jax.jit(losses)(params), *jax.jit(jax.value_and_grad(mean))(params))


@pytest.mark.parametrize("chunk_size", [0, 4, 16, 1024], ids=lambda c: f"chunk_size={c}")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_token_losses_and_param_gradients_match_the_full_logits(tied, chunk_size):
    """Per-token losses (zero on padding), the mask, and every param's gradient of the mean loss.

    chunk_size 0 is the reference path; 16 is the whole row in one chunk, and so is 1024 (longer
    than the row, as the TPU platform file's chunk in a seq-128 smoke run).
    """
    config = dataclasses.replace(CONFIG, tie_embeddings=tied)
    model, params, batch = Transformer(config), params_of(config), padded_batch()
    expected, expected_loss, expected_grads = expected_for(config)
    losses_fn = token_losses(chunk_size=chunk_size)
    losses, mask = jax.jit(lambda p: losses_fn(model, p, batch))(params)
    np.testing.assert_array_equal(mask, batch["segment_ids"] > 0)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)

    grad_fn = jax.jit(jax.value_and_grad(functools.partial(mean_loss, losses_fn, model)))
    loss, grads = grad_fn(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert ("token_embedding" if tied else "output_head") in grads
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        error = relative_error(grad, flat_expected[path])
        assert error < 1e-5, (jax.tree_util.keystr(path), error)


@pytest.mark.parametrize("chunk_size", [5, 12])
def test_chunk_size_that_does_not_divide_the_row_is_refused_before_compiling(chunk_size):
    """Refused while tracing on shapes alone (nothing compiled or run), naming both numbers."""
    model, params, batch = Transformer(CONFIG), params_of(CONFIG), padded_batch()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, batch))
    losses_fn = token_losses(chunk_size=chunk_size)
    message = f"token_losses.chunk_size={chunk_size} does not divide the sequence length 16"
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda p, b: losses_fn(model, p, b), *abstract)


def test_negative_chunk_size_is_refused():
    with pytest.raises(ValueError, match=r"token_losses\.chunk_size=-1"):
        token_losses(chunk_size=-1)


def loss_and_grad_temp_bytes(chunk_size: int, *, length: int) -> int:
    """XLA's temporary bytes for the mean loss and its gradients w.r.t. hidden states and kernel."""
    hidden = jax.ShapeDtypeStruct((2, length, 64), jnp.float32)
    kernel = jax.ShapeDtypeStruct((64, 8192), jnp.float32)
    targets = jax.ShapeDtypeStruct((2, length), jnp.int32)

    def loss(hidden, kernel, targets):
        if chunk_size:
            losses = chunked_cross_entropy(hidden, kernel, targets, chunk_size=chunk_size)
        else:
            logits = vocab_logits(hidden, kernel)
            losses = expected_losses(logits, targets, jnp.ones(targets.shape))
        return losses.mean()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_does_not_grow_with_the_number_of_chunks():
    """One chunk's float32 logits are 2 x 128 x 8192 x 4 B = 8 MiB, the full logits 64 or 128 MiB.

    The reference needs several full-logits buffers; the chunked loss about one chunk's few,
    plus hidden-sized buffers, however many chunks the row has (bench/loss_memory.py: figures).
    """
    full = loss_and_grad_temp_bytes(0, length=1024)
    chunked, twice_as_many_chunks = (
        loss_and_grad_temp_bytes(128, length=length) for length in (1024, 2048)
    )
    logits_bytes = 2 * 1024 * 8192 * 4
    assert full > logits_bytes
    assert chunked < logits_bytes / 2
    assert twice_as_many_chunks < logits_bytes / 2
