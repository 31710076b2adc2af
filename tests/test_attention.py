"""Attention implementations: the fused kernels equal the XLA reference, and bad choices are named.

The Pallas kernels run in Pallas' interpreter here (``interpret_kernels()``); on CPU that checks
the wrappers (scale, segment ids, GQA grouping, layout, sharding), with the kernels' own tiling and
online softmax executed step by step. What only a TPU or GPU can show (speed, Mosaic/Triton
lowering) is covered, for TPU, by compiling for libtpu's compile-only devices when libtpu is
installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AbstractMesh, AxisType, Mesh

from codemix_jax import sharding
from codemix_jax.model import ModelConfig, Transformer
from codemix_jax.model import attention as attention_lib
from codemix_jax.model.attention_kernels import (
    gpu_flash_attention,
    interpret_kernels,
    splash_attention,
)

KERNELS = {"splash": splash_attention, "gpu_flash": gpu_flash_attention}

# Three kernel tiles of 128 (splash tiles 384 by 128, the GPU kernel's forward by 128 and its
# backward by 32): documents cross tile edges, one ends on an edge, one is a single token.
LENGTH = 384
ROWS = [[70, 130, 1, 120], [128, 256]]  # row 0 ends in 63 padding tokens (segment id 0)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32  # GQA: query heads 0, 1 read KV head 0; 2, 3 read KV head 1

# Measured (float32, CPU interpreter; outputs up to 3, gradients up to 6 in size): outputs within
# 1.1e-6 of the reference, gradients within 2.5e-6. Dropping the segment ids, the causal mask, the
# 1/sqrt(d) scale or the GQA grouping moves them by O(0.1-1).
OUT_ATOL = 1e-5
GRAD_ATOL = 5e-5


def packed_segment_ids(rows: list[list[int]], length: int) -> np.ndarray:
    """``[len(rows), length]``: documents numbered from 1 in order, then padding (0)."""
    ids = np.zeros((len(rows), length), np.int32)
    for row, doc_lengths in enumerate(rows):
        ids[row, : sum(doc_lengths)] = np.repeat(np.arange(1, len(doc_lengths) + 1), doc_lengths)
    return ids


def random_qkv(rows: int = len(ROWS)) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unit-normal q, k, v: with head_dim 32 unscaled scores would be ~6x too large."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((rows, LENGTH, HEADS, HEAD_DIM))
    k, v = (rng.standard_normal((rows, LENGTH, KV_HEADS, HEAD_DIM)) for _ in range(2))
    return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v))


def outputs_and_grads(fn, q, k, v, segment_ids, cotangent):
    """``fn``'s output and the gradients of ``<output, cotangent>`` w.r.t. q, k and v."""
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
    return out, vjp(cotangent)


def numpy_attention(q, k, v, segment_ids) -> np.ndarray:
    """Softmax(q k^T / sqrt(d)) v over earlier-or-same tokens with the same segment id, float64."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = (np.repeat(t, group, axis=2) for t in (k, v))  # query head h reads KV head h // group
    length = q.shape[1]
    visible = np.tril(np.ones((length, length), bool)) & (
        segment_ids[:, :, None] == segment_ids[:, None, :]
    )
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(visible[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_reference_is_causal_attention_within_documents():
    """The reference the kernels are held to, against the formula; padding included."""
    q, k, v = random_qkv()
    segment_ids = packed_segment_ids(ROWS, LENGTH)
    out = attention_lib.xla_attention(q, k, v, jnp.asarray(segment_ids))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, segment_ids), atol=1e-5)


@pytest.mark.parametrize("implementation", sorted(KERNELS))
def test_kernel_matches_reference_outputs_and_gradients(implementation):
    q, k, v = random_qkv()
    segment_ids = jnp.asarray(packed_segment_ids(ROWS, LENGTH))
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    expected, expected_grads = outputs_and_grads(
        attention_lib.xla_attention, q, k, v, segment_ids, cotangent
    )
    with interpret_kernels():
        kernel = jax.jit(KERNELS[implementation])
        out, grads = outputs_and_grads(kernel, q, k, v, segment_ids, cotangent)
    np.testing.assert_allclose(out, expected, atol=OUT_ATOL, err_msg="attention output")
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, expected_grad, atol=GRAD_ATOL, err_msg=f"d{name}")


def walk_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, nested jaxprs (scan, custom_vjp, kernels) too."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(getattr(var.aval, "shape", ())) for var in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes += walk_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes += walk_shapes(sub)
    return shapes


@pytest.mark.parametrize("implementation", ["xla", *sorted(KERNELS)])
def test_only_the_reference_builds_an_l_by_l_buffer(implementation):
    """Traced for the real kernels (not interpreted): forward and backward, at any nesting."""
    fn = KERNELS.get(implementation, attention_lib.xla_attention)
    q, k, v = random_qkv()
    segment_ids = jnp.asarray(packed_segment_ids(ROWS, LENGTH))

    def loss(q, k, v):
        return fn(q, k, v, segment_ids).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    square = [shape for shape in walk_shapes(jaxpr) if list(shape).count(LENGTH) >= 2]
    assert bool(square) == (implementation == "xla"), square[:3]


@pytest.mark.parametrize("implementation", sorted(KERNELS))
def test_each_device_runs_the_kernel_on_its_own_rows_and_heads(implementation):
    """Traced under an abstract data=2 x fsdp=2 x tensor=2 mesh with the project's rules: the
    kernel's shard_map hands each device 1 of the 4 rows, 2 of the 4 query heads and the one KV
    head they read (the mesh test checks the values; this checks no device computes more)."""
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    q, k, v = random_qkv(rows=4)
    segment_ids = jnp.asarray(packed_segment_ids(ROWS * 2, LENGTH))
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        jaxpr = jax.make_jaxpr(KERNELS[implementation])(q, k, v, segment_ids)
    shard_map = next(eqn for eqn in jaxpr.eqns if eqn.primitive.name == "shard_map")
    per_device = [var.aval.shape for var in shard_map.params["jaxpr"].invars[-4:]]
    local_q, local_kv = (1, LENGTH, HEADS // 2, HEAD_DIM), (1, LENGTH, KV_HEADS // 2, HEAD_DIM)
    assert per_device == [local_q, local_kv, local_kv, (1, LENGTH)]


def tiny_config(**overrides) -> ModelConfig:
    """Two layers, GQA, a length the kernels tile; scanned and rematerialised like the 2.8B."""
    base = ModelConfig(
        vocab_size=128,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        d_ff=128,
        max_seq_len=128,
        scan_layers=True,
        remat=True,
    )
    return dataclasses.replace(base, **overrides)


def packed_batch(length: int = 128) -> dict[str, jax.Array]:
    """Four packed rows of documents (positions restart per document), two padded."""
    segment_ids = packed_segment_ids([[40, 1, 50, 20], [64, 64], [10, 100], [128]], length)
    starts = np.maximum.accumulate(
        np.where(np.diff(segment_ids, prepend=-1, axis=1) != 0, np.arange(length), 0), axis=1
    )
    tokens = np.random.default_rng(0).integers(0, 128, segment_ids.shape)
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(np.arange(length) - starts, jnp.int32),
    }


def init_params(config: ModelConfig) -> dict:
    """Init's params, boxed with their logical axis names (from a one-token row)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    model = Transformer(config)
    return model.init(jax.random.key(0), tokens, segment_ids=tokens + 1, positions=tokens)["params"]


def positions_of(batch: dict) -> dict:
    return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}


@functools.cache
def tiny_params(config: ModelConfig) -> dict:
    """Random params of init's shapes, 1/sqrt(fan-in) scaled (init's would be slow to compute
    eagerly, and its unit norm scales could hide a badly mixed attention)."""
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(config)))
    rng = np.random.default_rng(1)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[-1]), x.dtype), shapes
    )


def logits_and_grads(
    config: ModelConfig, batch: dict, params: dict | None = None
) -> tuple[jax.Array, dict]:
    """The model's logits and the gradient of their mean square over real tokens, per param."""

    def loss(params):
        logits = Transformer(config).apply(
            {"params": params},
            batch["tokens"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
        )
        real = (batch["segment_ids"] > 0)[..., None]
        return (jnp.where(real, logits, 0.0) ** 2).mean(), logits

    params = tiny_params(config) if params is None else params
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


# Measured: logits (up to 0.55) within 1.4e-7, parameter gradients (up to 0.01) within 1e-9, on
# one device and sharded over 8.
MODEL_LOGITS_ATOL = 1e-5
MODEL_GRADS_ATOL = 1e-6


def test_transformer_with_splash_matches_xla():
    """Whole model (scanned, rematerialised), packed batch: the same logits at every position and
    the same parameter gradients. (Both kernels meet the model again in the mesh test.)"""
    batch = packed_batch()
    reference = tiny_config()
    expected, expected_grads = logits_and_grads(reference, batch)
    with interpret_kernels():
        logits, grads = logits_and_grads(dataclasses.replace(reference, attention="splash"), batch)
    np.testing.assert_allclose(logits, expected, atol=MODEL_LOGITS_ATOL)
    for (path, grad), expected_grad in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(
            grad, expected_grad, atol=MODEL_GRADS_ATOL, err_msg=jax.tree_util.keystr(path)
        )


MESH_SCRIPT = os.path.join(os.path.dirname(__file__), "attention_mesh.py")


def test_kernels_under_the_model_sharding_match_one_device():
    """8 CPU devices, data=2 x fsdp=2 x tensor=2 (each device: one row, two query heads and their
    KV head), params and batch sharded by the project's rules: the kernels' shard_map must keep
    rows, heads and GQA groups together. Runs in its own process (the devices are set at start).
    """
    result = subprocess.run(
        [sys.executable, MESH_SCRIPT], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    errors = json.loads(line.removeprefix("RESULT "))
    assert set(errors) == {"splash", "gpu_flash"}
    for implementation, error in errors.items():
        assert error["logits"] < MODEL_LOGITS_ATOL, (implementation, error)
        assert error["grads"] < MODEL_GRADS_ATOL, (implementation, error)


def test_bad_attention_value_is_named():
    with pytest.raises(ValueError, match="attention='flash'"):
        ModelConfig(attention="flash")


def test_config_choices_are_the_implementations():
    config_choices = {"xla", "splash", "gpu_flash"}
    for choice in config_choices:
        ModelConfig(attention=choice)
    assert set(attention_lib.REQUIRED_PLATFORM) == config_choices


@pytest.mark.parametrize(("implementation", "needs"), [("splash", "TPU"), ("gpu_flash", "GPU")])
def test_kernel_the_platform_lacks_is_refused_by_name_before_compiling(implementation, needs):
    """On this CPU, outside interpret mode: init still works (it needs only shapes, so an AOT
    compile for TPU can build its state here), the first apply is refused while tracing."""
    config = tiny_config(attention=implementation)
    batch = packed_batch()
    model = Transformer(config)
    params = jax.eval_shape(lambda: {"params": nn.unbox(init_params(config))})
    message = f"attention='{implementation}' needs a {needs} but this model runs on 'cpu'"
    with pytest.raises(ValueError, match=message):
        jax.jit(model.apply).trace(params, batch["tokens"], **positions_of(batch))
    with pytest.raises(ValueError, match=message):
        attention_lib.check_attention(implementation, "cpu")
    other = {"splash": "gpu", "gpu_flash": "tpu"}[implementation]
    with pytest.raises(ValueError, match=f"runs on '{other}'"):
        attention_lib.check_attention(implementation, other)
    attention_lib.check_attention(implementation, needs.lower(), seq_len=8192)
    attention_lib.check_attention("xla", "cpu", seq_len=100)


@pytest.mark.parametrize("implementation", sorted(KERNELS))
def test_length_the_kernels_cannot_tile_is_named(implementation):
    message = (
        f"attention='{implementation}' needs a sequence length that is a multiple of 128, got 200"
    )
    with pytest.raises(ValueError, match=message):
        attention_lib.check_attention(
            implementation, "tpu" if implementation == "splash" else "gpu", 200
        )
    with interpret_kernels(), pytest.raises(ValueError, match=message):
        q, k, v = (jnp.zeros((1, 200, 2, 8)),) * 3
        KERNELS[implementation](q, k, v, jnp.ones((1, 200), jnp.int32))


# --- Compiled by the real TPU compiler for compile-only devices (libtpu), when it is installed.


def tpu_mesh() -> Mesh:
    """A v5e 2x2 slice's compile-only devices as data=1, fsdp=2, tensor=2; skip without libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")
    # libtpu takes a machine-wide lock file by default; a compile-only client needs no TPU, so
    # it may share the machine with another process using libtpu (an AOT compile, say).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(
            platform="tpu",
            topology_name="v5e:2x2",
            chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
            wrap=(False, False, False),
        ).devices
    except Exception as error:  # any libtpu failure means: no TPU compiler to test with
        pytest.skip(f"libtpu cannot describe a v5e 2x2 topology here: {error}")
    return Mesh(np.asarray(devices).reshape(1, 2, 2), sharding.MESH_AXES)


def test_splash_model_lowers_and_compiles_for_tpu_from_this_host():
    """What an ahead-of-time compile does: abstract sharded params and batch, the model traced
    under the TPU mesh (the platform check must see ``tpu`` there, not this CPU host), the Mosaic
    kernel in the program, and libtpu compiling it. head_dim 64 as in the 470M model."""
    mesh = tpu_mesh()
    config = tiny_config(attention="splash", max_seq_len=256, d_model=256, dtype="bfloat16")
    model = Transformer(config)
    rules = sharding.LOGICAL_AXIS_RULES
    boxed = jax.eval_shape(lambda: init_params(config))
    params, _ = sharding.sharded_abstract(boxed, mesh, rules, what="parameter")
    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))

    def loss(params, ids):
        return model.apply({"params": params}, ids, segment_ids=ids, positions=ids).mean()

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jax.jit(jax.grad(loss)).lower(params, ids)
    assert "tpu_custom_call" in lowered.as_text()
    lowered.compile()


def test_splash_on_tpu_needs_no_score_buffer():
    """The TPU compiler's memory analysis of one attention's forward and backward at length 8192
    (per chip: one row, one head): the reference's temporaries exceed its float32 scores
    (measured 384 MiB against 256), splash's are below 1 % of them (measured 0)."""
    mesh = tpu_mesh()
    length = 8192
    spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES, None, "tensor", None)
    qkv = jax.ShapeDtypeStruct(
        (2, length, 2, 64), jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, spec)
    )
    ids = jax.ShapeDtypeStruct((2, length), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    scores = length * length * 4

    def temp_bytes(fn) -> int:
        def loss(q, k, v, ids):
            return (fn(q, k, v, ids).astype(jnp.float32) ** 2).sum()

        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            compiled = (
                jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, ids).compile()
            )
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(attention_lib.xla_attention) > scores
    assert temp_bytes(splash_attention) < scores / 100


def test_gpu_flash_is_refused_under_a_tpu_mesh():
    """The platform comes from the mesh the model is traced under, not from this host."""
    mesh = tpu_mesh()
    with jax.set_mesh(mesh):
        assert attention_lib.target_platform() == "tpu"
        message = "'gpu_flash' needs a GPU but this model runs on 'tpu'"
        with pytest.raises(ValueError, match=message):
            attention_lib.check_attention("gpu_flash", attention_lib.target_platform())
