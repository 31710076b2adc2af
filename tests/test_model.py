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


def packed(doc_lengths: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``segment_ids, positions [batch, LENGTH]``: row ``i`` packs ``doc_lengths[i]``."""
    segment_ids, positions = zip(*map(layout, doc_lengths), strict=True)
    return np.stack(segment_ids), np.stack(positions)


def run(
    config: ModelConfig,
    tokens: np.ndarray,
    doc_lengths: list[list[int]],
    params: dict | None = None,
) -> jax.Array:
    """Logits for ``tokens [batch, LENGTH]`` with the initial (or the given) params."""
    segment_ids, positions = packed(doc_lengths)
    variables = nn.unbox(boxed_variables(config)) if params is None else {"params": params}
    return jitted_apply(config)(
        variables,
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
    {
        "norm": "layernorm",
        "tie_embeddings": False,
        "num_kv_heads": 2,
        "head_dim": 4,
        "rope_theta": 500.0,
    },
    {"block": "parallel", "norm": "layernorm", "scan_layers": False, "remat": True},
    {"dtype": "bfloat16", "param_dtype": "bfloat16", "use_bias": True, "tie_embeddings": False},
]


VARIANT_IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "default" for o in VARIANTS]

# A packed row: three documents, then one padding token (whose logits are never compared).
REFERENCE_DOCS = [7, 5, 3]
EPSILON = 1e-6  # of every norm, inside the square root
EMBEDDING_STD = 0.02  # the init's: mean square 4e-4, so a dropped or misplaced epsilon shows


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """The init's param tree refilled with random values that make every term move the logits.

    Init sets norm scales to 1 and biases to 0, so a missing bias or a scale applied in the wrong
    place would go unseen; here they are random. Matrices get 1/sqrt(fan-in) so activations stay
    O(1); embedding tables keep the init's small scale, where the norm epsilon matters.
    """
    rng = np.random.default_rng(seed)
    fan_in = {"out": config.num_heads * config.head_size, "wo": config.d_ff}

    def fill(path, leaf):
        module, name = (entry.key for entry in path[-2:])
        noise = rng.standard_normal(leaf.shape)
        if name == "scale":
            value = 1 + 0.5 * noise
        elif name == "bias":
            value = 0.5 * noise
        elif name == "embedding":
            value = EMBEDDING_STD * noise
        else:
            value = noise / np.sqrt(fan_in.get(module, config.d_model))
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(boxed_variables(config))["params"])


def ref_dense(config: ModelConfig, p: dict, x: np.ndarray, contract: int = 1) -> np.ndarray:
    """``x @ kernel`` over the last ``contract`` dims, plus the bias if the model has any."""
    y = np.tensordot(x, p["kernel"], axes=contract)
    return y + p["bias"] if config.use_bias else y


def ref_norm(config: ModelConfig, p: dict, x: np.ndarray) -> np.ndarray:
    """RMSNorm; LayerNorm removes the mean first and adds a bias when the model has biases."""
    if config.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + EPSILON) * p["scale"]
    return y + p["bias"] if config.norm == "layernorm" and config.use_bias else y


def ref_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE: dims ``i`` and ``i + d/2`` are one complex number turned by the angle
    ``position * theta ** (-2i / d)``."""
    d = x.shape[-1]
    angle = positions[..., None, None] * theta ** (-2 * np.arange(d // 2) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_visible(segment_ids: np.ndarray) -> np.ndarray:
    """``[b, query, key]``: earlier-or-same tokens of the query's own document.

    A padding token sees only itself: its logits are unspecified, this just keeps them finite.
    """
    length = segment_ids.shape[-1]
    causal = np.tril(np.ones((length, length), bool))
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
    real_key = (segment_ids > 0)[:, None, :]
    return (causal & same_document & real_key) | np.eye(length, dtype=bool)


def ref_attention(config, p, x, positions, visible) -> np.ndarray:
    """Softmax(q k^T / sqrt(head_dim)) v over visible keys, per head, then the output projection."""
    q, k, v = (ref_dense(config, p[name], x) for name in ("query", "key", "value"))
    if config.positions == "rope":
        q, k = (ref_rope(t, positions, config.rope_theta) for t in (q, k))
    group = config.num_heads // config.kv_heads
    k, v = (np.repeat(t, group, axis=2) for t in (k, v))  # query head h reads kv head h // group
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(config.head_size)
    scores = np.where(visible[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return ref_dense(config, p["out"], np.einsum("bhqk,bkhd->bqhd", weights, v), contract=2)


def ref_mlp(config: ModelConfig, p: dict, x: np.ndarray) -> np.ndarray:
    """SwiGLU ``silu(x W_gate) * (x W_i)``, or GELU in its tanh form (Flax's default)."""
    up = ref_dense(config, p["wi"], x)
    if config.mlp == "swiglu":
        gate = ref_dense(config, p["wi_gate"], x)
        hidden = gate / (1 + np.exp(-gate)) * up
    else:
        hidden = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))
    return ref_dense(config, p["wo"], hidden)


def ref_layer(params: dict, i: int) -> dict:
    """Layer ``i``'s params, from a scanned (leading ``layers`` axis) or an unrolled tree."""
    if "layers" in params:
        return jax.tree.map(lambda a: a[i], params["layers"])
    return params[f"layers_{i}"]


def reference_logits(config, params, tokens, segment_ids, positions) -> np.ndarray:
    """The decoder's forward pass in float64 numpy, written from the math rather than the model.

    Reads the Flax param tree (scanned ``layers`` or unrolled ``layers_i``) and follows the config:
    block, MLP, norm, biases, positions, GQA, head_dim and the tied or untied head.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["token_embedding"]["embedding"][tokens]
    if config.positions == "learned":
        x = x + p["position_embedding"]["embedding"][positions]
    visible = ref_visible(segment_ids)
    for i in range(config.num_layers):
        layer = ref_layer(p, i)
        attention = functools.partial(ref_attention, config, layer["attention"])
        if config.block == "parallel":
            normed = ref_norm(config, layer["norm"], x)
            x = x + attention(normed, positions, visible) + ref_mlp(config, layer["mlp"], normed)
        else:
            x = x + attention(ref_norm(config, layer["attention_norm"], x), positions, visible)
            x = x + ref_mlp(config, layer["mlp"], ref_norm(config, layer["mlp_norm"], x))
    x = ref_norm(config, p["final_norm"], x)
    tied = config.tie_embeddings
    return x @ (p["token_embedding"]["embedding"].T if tied else p["output_head"]["kernel"])


@pytest.mark.parametrize("overrides", VARIANTS, ids=VARIANT_IDS)
def test_variant_matches_numpy_reference(overrides):
    """Every variant's logits on a packed row equal an independent float64 forward pass.

    Errors are relative to the largest logit; measured: float32 below 1e-6, bfloat16 about 5e-3.
    """
    config = small(**overrides)
    params = random_params(config)
    tokens = random_tokens(LENGTH)[None]
    with jax.default_matmul_precision("highest"):  # no TF32 rounding of float32 on GPUs
        logits = run(config, tokens, [REFERENCE_DOCS], params)
    assert logits.shape == (1, LENGTH, config.vocab_size)
    assert logits.dtype == jnp.float32
    segment_ids, positions = packed([REFERENCE_DOCS])
    expected = reference_logits(config, params, tokens, segment_ids, positions)
    real = segment_ids > 0
    tolerance = 2e-2 if config.dtype == "bfloat16" else 1e-5
    error = np.abs(np.asarray(logits)[real] - expected[real]).max() / np.abs(expected[real]).max()
    assert error < tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("overrides", VARIANTS, ids=VARIANT_IDS)
def test_variant_params_have_logical_names(overrides):
    params = boxed_variables(small(**overrides))["params"]
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


def paper_a_count(d: int, layers: int, d_ff: int) -> tuple[int, int]:
    """(embedding, non-embedding) of the Aryabumi et al. shape, by hand.

    Per parallel layer: q, k, v, out (MHA, heads * head_dim = d), SwiGLU's three matrices and one
    bias-free LayerNorm scale; a tied 256K-row embedding counted once; a final norm scale.
    """
    per_layer = 4 * d * d + 3 * d * d_ff + d
    return 256_000 * d, layers * per_layer + d


def pangu_count(d: int = 2560, layers: int = 32, d_ff: int = 10240) -> tuple[int, int]:
    """(embedding, non-embedding) of the PanGu-style GPT, by hand.

    Per pre-LN layer: q, k, v, out with biases, a GELU MLP's two matrices with biases and two
    LayerNorms (scale and bias); token (40,192) and learned position (1,024) tables, the tied head
    counted once; a final LayerNorm.
    """
    attention = 4 * d * d + 4 * d
    mlp = 2 * d * d_ff + d_ff + d
    per_layer = attention + mlp + 2 * 2 * d
    return (40_192 + 1024) * d, layers * per_layer + 2 * d


@pytest.mark.parametrize(
    ("name", "hand", "total", "embedding", "paper", "deviation_pct"),
    [  # the exact integers of the README's model grid, and its "target" column
        ("470m.gin", paper_a_count(1024, 12, 4096), 463_483_904, 262_144_000, 470e6, -1.4),
        ("2p8b.gin", paper_a_count(2048, 34, 8192), 2_806_061_056, 524_288_000, 2.8e9, 0.2),
        ("pangu_2p6b.gin", pangu_count(), 2_623_165_440, 105_512_960, 2.6e9, 0.9),
    ],
    ids=["470m", "2p8b", "pangu_2p6b"],
)
def test_grid_parameter_counts_are_exact(
    gin_model, name, hand, total, embedding, paper, deviation_pct
):
    """Exact counts: a missing layer, norm or bias changes them, where a 5 % band would not."""
    assert hand == (embedding, total - embedding)
    assert count_parameters(gin_model(name)) == {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
    }
    assert round(100 * (total - paper) / paper, 1) == deviation_pct
