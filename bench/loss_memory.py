"""Temporary memory of the loss and its gradients: full float32 logits vs the chunked cross entropy.

Compiles (nothing is allocated or run) the mean next-token loss over real tokens and its gradients
w.r.t. the final hidden states and the output projection, as the train step takes them, and prints
XLA's temporary bytes for each ``token_losses.chunk_size``. The defaults are one TPU v5e chip's
share of paper A's 470M step (global batch 512 over 256 chips: 2 rows of 8192 tokens, d_model 1024,
vocabulary 256,000, bfloat16 activations, float32 params). CPU compilation stands in for the TPU:
absolute bytes differ by backend, the ratio is the point.

Then it times both forms at a size this CPU runs in seconds (``--time_*``), to show what the
backward pass's recomputation costs.

    .venv/bin/python bench/loss_memory.py [--batch 2 --seq 8192 --d_model 1024 --vocab 256000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codemix_jax.model.layers import vocab_logits
from codemix_jax.model.loss import chunked_cross_entropy

GIB = 2**30


def mean_loss(chunk_size: int):
    """``(hidden, kernel, targets, mask) -> mean loss``: the reference (0) or chunked."""

    def loss(hidden, kernel, targets, mask):
        if chunk_size:
            losses = chunked_cross_entropy(hidden, kernel, targets, chunk_size=chunk_size)
        else:
            logits = vocab_logits(hidden, kernel)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (losses * mask).sum() / mask.sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def shapes(batch: int, seq: int, d_model: int, vocab: int, dtype: str):
    return (
        jax.ShapeDtypeStruct((batch, seq, d_model), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((d_model, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, seq), jnp.float32),
    )


def memory_table(args) -> None:
    args_shapes = shapes(args.batch, args.seq, args.d_model, args.vocab, args.dtype)
    logits_gib = args.batch * args.seq * args.vocab * 4 / GIB
    print(
        f"loss + gradients, batch {args.batch} x seq {args.seq}, d_model {args.d_model}, "
        f"vocab {args.vocab}, {args.dtype} hidden, float32 kernel; "
        f"full float32 logits = {logits_gib:.2f} GiB"
    )
    print(f"{'chunk_size':>10} {'temp GiB':>9} {'vs full':>8} {'one chunk logits GiB':>21}")
    reference = None
    for chunk_size in [0, *args.chunks]:
        compiled = mean_loss(chunk_size).lower(*args_shapes).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        reference = reference or temp
        chunk_logits = args.batch * (chunk_size or args.seq) * args.vocab * 4 / GIB
        label = chunk_size or "0 (full)"
        print(f"{label:>10} {temp / GIB:9.3f} {temp / reference:8.3f} {chunk_logits:21.3f}")


def median_seconds(fn, inputs, repeats: int) -> float:
    jax.block_until_ready(fn(*inputs))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_table(args) -> None:
    rng = np.random.default_rng(0)
    b, seq, d, vocab = args.time_batch, args.time_seq, args.time_d_model, args.time_vocab
    inputs = (
        jnp.asarray(rng.standard_normal((b, seq, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((d, vocab)) / np.sqrt(d), jnp.float32),
        jnp.asarray(rng.integers(0, vocab, (b, seq)), jnp.int32),
        jnp.ones((b, seq), jnp.float32),
    )
    print(f"\nloss + gradients run time, batch {b} x seq {seq}, d_model {d}, vocab {vocab}, f32")
    reference = None
    for chunk_size in [0, *args.time_chunks]:
        seconds = median_seconds(mean_loss(chunk_size), inputs, args.repeats)
        reference = reference or seconds
        label = chunk_size or "0 (full)"
        print(f"{label:>10} {seconds * 1e3:9.1f} ms {seconds / reference:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048, 1024, 512, 256])
    parser.add_argument("--time_batch", type=int, default=2)
    parser.add_argument("--time_seq", type=int, default=1024)
    parser.add_argument("--time_d_model", type=int, default=256)
    parser.add_argument("--time_vocab", type=int, default=32_000)
    parser.add_argument("--time_chunks", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    memory_table(args)
    time_table(args)


if __name__ == "__main__":
    main()
