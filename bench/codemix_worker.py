"""Time codemix's jitted train step for the benchmark model; one JSON line on stdout.

Run by ``bench/maxtext_compare.py`` in its own process, alternating with MaxText's worker, so that
neither inherits the other's compiled code, threads or memory. The step is the one ``codemix train``
runs (``make_train_step`` with ``token_losses``, AdamW from ``codemix_jax.optim``, the default mesh
and axis rules), on one fixed batch of packed rows: input reading is not part of the timing.

Only the model's definition is pinned here (Llama-style block, sizes, untied head, float32). How it
is computed (``scan_layers``, ``remat``, ``attention``, the loss's ``chunk_size``) is left at the
defaults a user gets, and reported.

    python bench/codemix_worker.py step [--steps 10] [--warmup 2]      # the default step
    python bench/codemix_worker.py breakdown [--steps 5]                # where the step's time goes
    python bench/codemix_worker.py input                                # the input iterator alone
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from codemix_jax import optim, sharding
from codemix_jax.model import ModelConfig, Transformer, training_flops_per_token
from codemix_jax.model.layers import vocab_logits
from codemix_jax.model.loss import chunked_cross_entropy, token_losses
from codemix_jax.model.param_count import count_parameters
from codemix_jax.train_state import (
    global_batch,
    init_train_state,
    make_train_step,
    state_layout,
)

SEQ_LEN = 256
BATCH = 8
NUM_SOURCES = 3  # as the demo mixture: code, text, markup
DEMO_CORPUS = "data/local/corpus"  # `make data`; only the input iterator's timing reads it
DEMO_VOCAB = "data/local/spm.model"

# The benchmark model: a Llama-style block (pre-norm RMSNorm, RoPE, SwiGLU, no biases), 4 layers,
# d_model 256, 4 heads of 64, MLP 1024, 32000-token vocabulary with an untied head, float32.
MODEL = {
    "vocab_size": 32000,
    "d_model": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 4,
    "head_dim": 64,
    "d_ff": 1024,
    "max_seq_len": SEQ_LEN,
    "block": "sequential",
    "mlp": "swiglu",
    "norm": "rmsnorm",
    "positions": "rope",
    "use_bias": False,
    "tie_embeddings": False,
    "dtype": "float32",
    "param_dtype": "float32",
}


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """One host batch laid out as ``pack_rows`` lays it out: 2-8 documents per row, positions
    restarting at each document, input 0 at a document's first position, random token ids."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, MODEL["vocab_size"], (BATCH, SEQ_LEN), dtype=np.int32)
    segment_ids = np.ones((BATCH, SEQ_LEN), np.int32)
    positions = np.zeros((BATCH, SEQ_LEN), np.int32)
    for row in range(BATCH):
        starts = np.sort(rng.choice(np.arange(1, SEQ_LEN), rng.integers(1, 8), replace=False))
        segment_ids[row] = 1 + np.searchsorted(starts, np.arange(SEQ_LEN), side="right")
        bounds = np.concatenate([[0], starts])
        positions[row] = np.arange(SEQ_LEN) - bounds[segment_ids[row] - 1]
    inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
    source_id = rng.integers(0, NUM_SOURCES, (BATCH,), dtype=np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "source_id": source_id,
    }


def loss_chunk_size() -> int:
    """The loss's ``chunk_size`` a user gets when gin does not bind it (0 = full logits)."""
    return inspect.signature(token_losses).parameters["chunk_size"].default


def settings(config: ModelConfig, chunk_size: int) -> dict[str, Any]:
    """The knobs that decide how the model is computed, as this run has them."""
    return {
        "scan_layers": config.scan_layers,
        "remat": config.remat,
        "attention": config.attention,
        "loss_chunk_size": chunk_size,
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
    }


def timed(fns: dict[str, Callable[[], Any]], *, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of every ``fn``, ``steps`` rounds after ``warmup`` untimed ones (compile
    included). The functions take turns within a round, so a change in the machine's load falls on
    all of them alike. Each ``fn`` must block until its results are ready."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


class Bench:
    """The model, optimizer, state, step and batch, built as ``codemix train`` builds them.

    ``chunk_size`` (default: the user's default) is bound in gin for ``token_losses`` while the
    step is built, as a gin file would bind it.
    """

    def __init__(self, config: ModelConfig, chunk_size: int | None = None):
        self.config = config
        self.chunk_size = loss_chunk_size() if chunk_size is None else chunk_size
        self.model = Transformer(config)
        schedule = optim.warmup_cosine(peak=3e-4, warmup_steps=10, total_steps=10_000)
        self.tx = optim.adamw(schedule)
        self.mesh = sharding.make_mesh()
        self.rules = sharding.logical_axis_rules()
        with self.context():
            _, self.shardings = state_layout(
                model=self.model, tx=self.tx, mesh=self.mesh, rules=self.rules
            )
            self.state = init_train_state(
                model=self.model, tx=self.tx, shardings=self.shardings, seed=0
            )
            gin.bind_parameter("token_losses.chunk_size", self.chunk_size)
            self.step = make_train_step(
                model=self.model,
                tx=self.tx,
                num_sources=NUM_SOURCES,
                state_shardings=self.shardings,
                mesh=self.mesh,
            )
            gin.clear_config()
            self.batch = global_batch(packed_batch(), self.mesh)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical axis rules that ``train()`` traces its step under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def run_step(self) -> None:
        with self.context():
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics)

    def settings(self) -> dict[str, Any]:
        return settings(self.config, self.chunk_size)

    def compiled_flops(self) -> float | None:
        """XLA's FLOP count of the compiled step (a scanned layer body is counted once)."""
        with self.context():
            analysis = self.step.lower(self.state, self.batch).compile().cost_analysis()
        if isinstance(analysis, list):  # older JAX returns one dict per device
            analysis = analysis[0]
        return float(analysis["flops"]) if analysis and "flops" in analysis else None


def step_parts(bench: Bench) -> dict[str, Callable[[], Any]]:
    """The step's parts, each jitted alone on the step's own inputs, as blocking calls:

    - ``loss_grad``: the loss and its gradients (model forward + backward), no optimizer;
    - ``head_grad``: only the output head and cross entropy, forward + backward, from final
      hidden states (what the loss does after the last layer, with the same ``chunk_size``);
    - ``trunk_grad``: embedding, layers and final norm forward + backward, without the head;
    - ``optimizer``: gradient clipping and the AdamW update of every parameter.
    """
    # Copies: the step donates (and so deletes) the state it is given.
    params, opt_state = jax.tree.map(jnp.copy, (bench.state.params, bench.state.opt_state))
    model, batch = bench.model, bench.batch
    losses_fn = token_losses()
    num_tokens = jnp.maximum((batch["segment_ids"] > 0).sum(), 1).astype(jnp.float32)
    chunk_size = loss_chunk_size()
    inputs = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    with bench.context():
        hidden, kernel = model.apply({"params": params}, batch["inputs"], **inputs, head=False)
    cotangent = jax.random.normal(jax.random.key(1), hidden.shape, hidden.dtype)

    def loss_grad(params):
        return jax.grad(lambda p: losses_fn(model, p, batch)[0].sum() / num_tokens)(params)

    def head_loss(hidden, kernel):
        if chunk_size:
            losses = chunked_cross_entropy(hidden, kernel, batch["targets"], chunk_size=chunk_size)
        else:
            logits = vocab_logits(hidden, kernel)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return losses.sum() / num_tokens

    def trunk_loss(params):
        out, _ = model.apply({"params": params}, batch["inputs"], **inputs, head=False)
        return (out * cotangent).sum()

    def optimizer(grads, opt_state, params):
        updates, opt_state = bench.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    parts = {
        "loss_grad": (jax.jit(loss_grad), (params,)),
        "head_grad": (jax.jit(jax.grad(head_loss, argnums=(0, 1))), (hidden, kernel)),
        "trunk_grad": (jax.jit(jax.grad(trunk_loss)), (params,)),
        "optimizer": (jax.jit(optimizer), (params, opt_state, params)),
    }

    def call(fn, args) -> Callable[[], Any]:
        def run():
            with bench.context():
                jax.block_until_ready(fn(*args))

        return run

    return {name: call(fn, args) for name, (fn, args) in parts.items()}


def input_times(*, batches: int) -> dict[str, Any]:
    """Seconds per batch of the demo mixture's iterator at this benchmark's shape, assembled into
    device arrays as the train loop does (what a step waits for if nothing overlaps it)."""
    if not (os.path.exists(DEMO_VOCAB) and os.path.isdir(DEMO_CORPUS)):
        return {"skipped": f"no demo corpus at {DEMO_CORPUS}: run `make data` first"}
    from codemix_jax.data import MixtureInput
    from codemix_jax.data.sources import local_sources

    dataset = MixtureInput(
        sources=local_sources(corpus_dir=DEMO_CORPUS),
        vocab_path=DEMO_VOCAB,
        shares={"code": 0.5, "text": 0.4, "markup": 0.1},
        seq_len=SEQ_LEN,
        global_batch_size=BATCH,
    )
    mesh = sharding.make_mesh()
    iterator = dataset.host_batches()

    def next_batch() -> None:
        jax.block_until_ready(global_batch(next(iterator), mesh))

    # The mean, not the median: tf.data prefetches, so most calls are quick and a few wait.
    times = timed({"batch": next_batch}, steps=batches, warmup=5)["batch"]
    return {"mean_batch_s": statistics.mean(times), "batch_times_s": times}


def step_result(bench: Bench, times: list[float], **extra: Any) -> dict[str, Any]:
    config = bench.config
    return {
        "system": "codemix",
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "step_times_s": times,
        "tokens_per_step": BATCH * SEQ_LEN,
        "num_params": count_parameters(config)["total"],
        "flops_per_token": training_flops_per_token(config, SEQ_LEN),
        "head_params": config.d_model * config.vocab_size,
        "settings": bench.settings(),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("step", "breakdown", "input"))
    parser.add_argument("--steps", type=int, default=10, help="timed calls after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (compile included)")
    args = parser.parse_args()
    if args.mode == "input":
        print(json.dumps(input_times(batches=50)))
        return
    config = ModelConfig(**MODEL)
    bench = Bench(config)
    if args.mode == "step":
        times = timed({"step": bench.run_step}, steps=args.steps, warmup=args.warmup)["step"]
        print(json.dumps(step_result(bench, times)))
        return
    # Breakdown: the default step, its parts, and the step with other settings of the two
    # knobs that matter here (layers unrolled; the other loss: chunked with one chunk per row if
    # the default is full logits, else full logits), taking turns in one process so that the
    # shares compare times taken under the same load.
    other_chunk = SEQ_LEN if bench.chunk_size == 0 else 0
    unrolled_config = dataclasses.replace(config, scan_layers=False)
    variants = {
        "unrolled_step": Bench(unrolled_config),
        "other_loss_step": Bench(config, chunk_size=other_chunk),
        "unrolled_other_loss_step": Bench(unrolled_config, chunk_size=other_chunk),
    }
    fns = {
        "step": bench.run_step,
        **step_parts(bench),
        **{name: variant.run_step for name, variant in variants.items()},
    }
    times = timed(fns, steps=args.steps, warmup=args.warmup)
    result = step_result(
        bench,
        times.pop("step"),
        parts={name: statistics.median(t) for name, t in times.items()},
        variant_settings={name: variant.settings() for name, variant in variants.items()},
        unrolled_compiled_flops=variants["unrolled_step"].compiled_flops(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
