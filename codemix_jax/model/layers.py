"""Building blocks shared by attention and the transformer: dense, norm, MLP, embeddings, RoPE.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) so that one rules
table elsewhere decides how it is sharded; the model itself never mentions a mesh axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from codemix_jax.model.config import ModelConfig

BATCH_LENGTH = ("activation_batch", "activation_length")


def normal_init(config: ModelConfig, axes: tuple[str, ...]) -> nn.initializers.Initializer:
    """The initializer of every weight matrix and embedding, boxed with its logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_std), axes)


def constrain(x: jax.Array, *names: str) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op unless axis rules are active."""
    return nn.with_logical_constraint(x, names)


class Dense(nn.Module):
    """``x @ kernel`` over the last ``contract`` input dims, with logically named kernel and bias.

    Written out rather than ``nn.DenseGeneral``, which initialises a flattened 2-D kernel: its axis
    names would then not match the kernel's rank once a mesh is active.
    """

    config: ModelConfig
    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]  # input axes then output axes; the bias takes the output ones
    contract: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = self.param(
            "kernel",
            normal_init(cfg, self.kernel_axes),
            (*x.shape[-self.contract :], *self.features),
            cfg.weight_dtype,
        )
        dtype = cfg.compute_dtype
        y = matmul(x.astype(dtype), kernel.astype(dtype), contract=self.contract)
        if not cfg.use_bias:
            return y
        bias_axes = self.kernel_axes[-len(self.features) :]
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, bias_axes)
        return y + self.param("bias", bias_init, self.features, cfg.weight_dtype).astype(dtype)


def matmul(
    x: jax.Array,
    kernel: jax.Array,
    *,
    contract: int = 1,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """``x [*rows, *k] @ kernel [*k, *n] -> [*rows, *n]``, ``k`` the last ``contract`` dims of x.

    Computed as one 2-D matmul ``[rows, k] @ [k, n]``: the same sums as ``tensordot``, but the
    gradient of the kernel then contracts a single row axis. With batch and length as two row
    axes, XLA:CPU transposes operands around that matmul (a dense layer's gradient took 1.5x
    as long at the benchmark's shapes, BENCHMARKS.md); on TPU the reshapes are free.
    """
    rows, k = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    n = kernel.shape[contract:]
    y = jnp.dot(
        x.reshape(-1, math.prod(k)),
        kernel.reshape(math.prod(k), math.prod(n)),
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*rows, *n)


def norm(config: ModelConfig, *, name: str) -> nn.Module:
    """RMSNorm or LayerNorm over the embedding axis; params are named ``scale`` and ``bias``."""
    common = {
        "epsilon": 1e-6,
        "dtype": config.compute_dtype,
        "param_dtype": config.weight_dtype,
        "scale_init": nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        "name": name,
    }
    if config.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(
        use_bias=config.use_bias,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        **common,
    )


class Mlp(nn.Module):
    """Feed-forward layer: SwiGLU (gated, three matrices) or GELU (two matrices)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        up = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), name="wi")(x)
        if cfg.mlp == "swiglu":
            gate = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), name="wi_gate")(x)
            hidden = nn.silu(gate) * up
        else:
            hidden = nn.gelu(up)
        hidden = constrain(hidden, *BATCH_LENGTH, "activation_mlp")
        return Dense(cfg, (cfg.d_model,), ("mlp", "embed"), name="wo")(hidden)


class Embed(nn.Module):
    """A lookup table ``[num_embeddings, d_model]``; its transpose is the tied output head."""

    config: ModelConfig
    num_embeddings: int
    axis_name: str  # logical name of the table's rows: "vocab" or "position"

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            normal_init(self.config, (self.axis_name, "embed")),
            (self.num_embeddings, self.config.d_model),
            self.config.weight_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.config.compute_dtype)


class OutputHead(nn.Module):
    """The untied output projection: only its ``kernel [d_model, vocab]``, which ``vocab_logits``
    applies (the tied head is the transposed embedding table)."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.kernel = self.param(
            "kernel",
            normal_init(cfg, ("embed", "vocab")),
            (cfg.d_model, cfg.vocab_size),
            cfg.weight_dtype,
        )


def vocab_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Float32 scores ``x @ kernel`` of ``x [..., d_model]`` against ``kernel [d_model, vocab]``.

    Multiplied in ``x``'s dtype with float32 accumulation. The full-logits head and the chunked
    loss (``model/loss.py``) both project through here, so they round alike.
    """
    return matmul(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half layout) of ``x [b, l, heads, d]`` at ``positions [b, l]``.

    Angles are computed in float32: bf16 cannot even represent positions above 256 exactly.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * inv_freq  # [b, l, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
