"""Transformer behaviour: causality, packing independence, variants, sharding names, sizes."""

from __future__ import annotations

import dataclasses
import functools
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

from codemix_jax.model import (
    ModelConfig,
    Transformer,
    count_parameters,
    training_flops_per_token,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARAM_AXES = {
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "layers",
    "norm",
    "position",
}
ACTIVATION_AXES = (
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_mlp",
    "activation_heads",
    "activation_kv_heads",
    "activation_head_dim",
    "activation_vocab",
)

LENGTH = 16
SMALL = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=LENGTH
)


def small(**overrides) -> ModelConfig:
    return dataclasses.replace(SMALL, **overrides)


def random_tokens(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SMALL.vocab_size, length)


def layout(doc_lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and positions of a row packing documents of ``doc_lengths``, then padding."""
    segment_ids = np.zeros(LENGTH, np.int32)
    positions = np.zeros(LENGTH, np.int32)
    start = 0
    for segment, doc_length in enumerate(doc_lengths, start=1):
        segment_ids[start : start + doc_length] = segment
        positions[start : start + doc_length] = np.arange(doc_length)
        start += doc_length
    return segment_ids, positions


@functools.cache
def boxed_variables(config: ModelConfig) -> dict:
    """Initial variables with their logical-axis boxes (cached: each init compiles the model)."""
    tokens = jnp.zeros((1, LENGTH), jnp.int32)
    init = jax.jit(Transformer(config).init)
    return init(jax.random.key(0), tokens, segment_ids=tokens + 1, positions=tokens)


@functools.cache
def jitted_apply(config: ModelConfig):
    return jax.jit(Transformer(config).apply)


def run(config: ModelConfig, tokens: np.ndarray, doc_lengths: list[list[int]]) -> jax.Array:
    """Logits for ``tokens [batch, LENGTH]``, row ``i`` packing documents of ``doc_lengths[i]``."""
    segment_ids, positions = (
        np.stack(rows) for rows in zip(*map(layout, doc_lengths), strict=True)
    )
    return jitted_apply(config)(
        nn.unbox(boxed_variables(config)),
        jnp.asarray(tokens, jnp.int32),
        segment_ids=jnp.asarray(segment_ids),
        positions=jnp.asarray(positions),
    )


@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_future_tokens_do_not_change_past_logits(block):
    cuts = (0, 6, 13)
    tokens = np.tile(random_tokens(LENGTH), (1 + len(cuts), 1))
    for row, t in enumerate(cuts, start=1):
        tokens[row, t + 1 :] = (tokens[row, t + 1 :] + 1) % SMALL.vocab_size
    logits = np.asarray(run(small(block=block), tokens, [[LENGTH]] * len(tokens)))
    for row, t in enumerate(cuts, start=1):
        np.testing.assert_allclose(logits[row, : t + 1], logits[0, : t + 1], atol=1e-5)
        assert not np.allclose(logits[row, t + 1 :], logits[0, t + 1 :], atol=1e-3)


@pytest.mark.parametrize(("block", "positions"), [("sequential", "rope"), ("parallel", "learned")])
def test_packed_document_matches_document_alone(block, positions):
    config = small(block=block, positions=positions, num_kv_heads=2)
    doc, before, after = (
        random_tokens(6, seed=1),
        random_tokens(5, seed=2),
        random_tokens(4, seed=3),
    )
    tokens = np.stack(
        [
            np.concatenate([doc, np.zeros(LENGTH - 6, np.int64)]),
            np.concatenate([before, doc, after, [0]]),
        ]
    )
    logits = np.asarray(run(config, tokens, [[6], [5, 6, 4]]))
    np.testing.assert_allclose(logits[1, 5:11], logits[0, :6], atol=1e-5)
    assert not np.allclose(logits[1, 11:15], logits[0, 6:10], atol=1e-3)


VARIANTS = [
    {},
    {"block": "parallel", "mlp": "gelu", "norm": "layernorm", "use_bias": True},
    {"block": "parallel", "positions": "learned", "tie_embeddings": False, "num_kv_heads": 2},
    {"mlp": "gelu", "use_bias": True, "positions": "learned", "num_kv_heads": 1},
    {"norm": "layernorm", "tie_embeddings": False, "num_kv_heads": 2, "head_dim": 4},
    {"block": "parallel", "norm": "layernorm", "scan_layers": False, "remat": True},
    {"dtype": "bfloat16", "param_dtype": "bfloat16", "use_bias": True, "tie_embeddings": False},
]


@pytest.mark.parametrize(
    "overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_variant_runs_with_named_params(overrides):
    config = small(**overrides)
    logits = run(config, random_tokens(LENGTH)[None], [[9, 5]])
    assert logits.shape == (1, LENGTH, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    params = boxed_variables(config)["params"]
    specs = jax.tree.leaves(nn.get_partition_spec(params), is_leaf=lambda x: x is None)
    for spec, leaf in zip(specs, jax.tree.leaves(nn.unbox(params)), strict=True):
        assert spec is not None and len(spec) == leaf.ndim, (spec, leaf.shape)
        assert set(spec) <= PARAM_AXES, spec


def param_paths(config: ModelConfig) -> set[str]:
    params = nn.unbox(boxed_variables(config)["params"])
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_parameter_paths_are_easy_to_mask_by_name():
    biased = param_paths(small(**VARIANTS[1]))
    assert {
        "['token_embedding']['embedding']",
        "['final_norm']['scale']",
        "['final_norm']['bias']",
        "['layers']['norm']['bias']",
        "['layers']['attention']['query']['bias']",
        "['layers']['mlp']['wo']['bias']",
    } <= biased
    untied = param_paths(small(**VARIANTS[2]))
    assert {"['position_embedding']['embedding']", "['output_head']['kernel']"} <= untied
    assert not any("bias" in path for path in untied)


def test_activations_are_constrained_with_allowed_logical_names_only():
    # One size-1 mesh axis per allowed name: a name missing from the rules would show up as None.
    mesh = Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(ACTIVATION_AXES)), ACTIVATION_AXES)
    rules = [(name, name) for name in ACTIVATION_AXES]
    # Unrolled and without remat, so every constraint sits in the top-level jaxpr.
    config = small(scan_layers=False, tie_embeddings=False, num_kv_heads=2)
    tokens = jnp.asarray(random_tokens(LENGTH)[None], jnp.int32)
    segment_ids, positions = (jnp.asarray(x[None]) for x in layout([LENGTH]))
    params = nn.unbox(boxed_variables(config))

    def forward(params):
        return Transformer(config).apply(
            params, tokens, segment_ids=segment_ids, positions=positions
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jaxpr = jax.make_jaxpr(forward)(params)
        constrained = jax.jit(forward)(params)
    specs = [
        eqn.params["sharding"].spec
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "sharding_constraint"
    ]
    assert len(specs) >= 4 * config.num_layers
    for spec in specs:
        assert all(axis in ACTIVATION_AXES for axis in spec), spec
    np.testing.assert_allclose(constrained, forward(params), atol=1e-5)


def test_scan_remat_and_unrolled_layers_compute_the_same_function():
    unrolled = small(scan_layers=False)
    tokens, doc_lengths = random_tokens(LENGTH)[None], [[10, 6]]
    expected = run(unrolled, tokens, doc_lengths)
    params = nn.unbox(boxed_variables(unrolled))["params"]
    layers = [params.pop(f"layers_{i}") for i in range(unrolled.num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    segment_ids, positions = (jnp.asarray(x[None]) for x in layout(doc_lengths[0]))
    for remat in (False, True):
        logits = Transformer(small(remat=remat)).apply(
            {"params": params}, jnp.asarray(tokens), segment_ids=segment_ids, positions=positions
        )
        np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_too_long_sequence_is_rejected():
    tokens = jnp.zeros((1, LENGTH + 4), jnp.int32)
    with pytest.raises(ValueError, match="20 exceeds max_seq_len=16"):
        Transformer(SMALL).init(jax.random.key(0), tokens, segment_ids=tokens + 1, positions=tokens)


@pytest.mark.parametrize(
    ("overrides", "bad"),
    [
        ({"block": "serial"}, "serial"),
        ({"mlp": "relu"}, "relu"),
        ({"norm": "batchnorm"}, "batchnorm"),
        ({"positions": "alibi"}, "alibi"),
        ({"dtype": "float16"}, "float16"),
        ({"num_kv_heads": 3}, "num_kv_heads=3"),
        ({"d_model": 30}, "d_model=30"),
        ({"num_layers": 0}, "num_layers=0"),
        ({"head_dim": 5}, "head_dim=5"),
    ],
)
def test_bad_config_value_is_named(overrides, bad):
    with pytest.raises(ValueError, match=bad):
        small(**overrides)


@pytest.fixture
def gin_model():
    """Parse one gin model file and return its ModelConfig; clear gin afterwards."""
    gin.add_config_file_search_path(REPO_ROOT)
    gin.clear_config()

    def parse(name: str) -> ModelConfig:
        gin.parse_config_files_and_bindings([os.path.join(REPO_ROOT, "gin/models", name)], [])
        return ModelConfig()

    yield parse
    gin.clear_config()


def test_tiny_gin_parameter_count_matches_hand_count(gin_model):
    config = gin_model("tiny.gin")
    d, vocab, d_ff, layers = 64, 2048, 256, 2
    per_layer = 4 * d * d + 3 * d * d_ff + 2 * d  # q, k, v, out; SwiGLU; two RMSNorm scales
    embedding = vocab * d  # tied: counted once
    assert count_parameters(config) == {
        "total": embedding + layers * per_layer + d,  # + final norm
        "embedding": embedding,
        "non_embedding": layers * per_layer + d,
    }
    matmul = layers * (4 * d * d + 3 * d * d_ff) + vocab * d
    attention = 12 * layers * 128 * d
    assert training_flops_per_token(config, 128) == 6 * matmul + attention


@pytest.mark.parametrize(
    ("name", "target"),
    [("470m.gin", 470e6), ("2p8b.gin", 2.8e9), ("pangu_2p6b.gin", 2.6e9)],
)
def test_grid_parameter_counts_match_papers(gin_model, name, target):
    total = count_parameters(gin_model(name))["total"]
    assert abs(total - target) <= 0.05 * target, f"{name}: {total:,}"
