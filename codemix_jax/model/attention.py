"""Causal self-attention that never crosses a packed-document boundary (MHA/GQA, RoPE or none).

``ModelConfig.attention`` picks how the scores are computed: ``xla`` (the reference below, any
platform, an ``l x l`` score buffer), ``splash`` (TPU) or ``gpu_flash`` (GPU), the fused kernels of
``attention_kernels``. All three compute the same function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from codemix_jax.model import attention_kernels
from codemix_jax.model.config import ModelConfig
from codemix_jax.model.layers import BATCH_LENGTH, Dense, apply_rope, constrain

# The platform each implementation needs (None: any); keys are ModelConfig's attention choices.
REQUIRED_PLATFORM = {"xla": None, "splash": "tpu", "gpu_flash": "gpu"}


def document_mask(segment_ids: jax.Array) -> jax.Array:
    """``[b, 1, l, l]`` True where query and key are in the same document.

    Causality is added by the attention call; together they keep packed documents independent.
    Padding (id 0) is one more document, as the kernels' segment ids treat it: every query then
    sees at least itself, and all implementations agree at every position, padding included.
    """
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The reference: ``q [b, l, heads, d]``, ``k, v [b, l, kv_heads, d]`` -> ``[b, l, heads, d]``.

    Softmax runs in float32 inside ``dot_product_attention``; GQA groups are handled there too.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=document_mask(segment_ids), is_causal=True)


_IMPLEMENTATIONS = {
    "xla": xla_attention,
    "splash": attention_kernels.splash_attention,
    "gpu_flash": attention_kernels.gpu_flash_attention,
}


def target_platform() -> str:
    """The platform the code being traced will run on: the active mesh's devices' platform (so
    lowering for TPU topology devices from a CPU host says ``tpu``), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def check_attention(implementation: str, platform: str, seq_len: int | None = None) -> None:
    """Refuse, by name, an implementation that ``platform`` cannot run or a length it cannot tile.

    Called when the model is traced (before anything compiles); a train loop or an ahead-of-time
    compiler may call it earlier with the platform of its mesh, ``mesh.devices.flat[0].platform``.
    Inside ``attention_kernels.interpret_kernels()`` every platform runs every kernel.
    """
    if implementation not in REQUIRED_PLATFORM:
        raise ValueError(
            f"ModelConfig.attention={implementation!r}: not in {tuple(REQUIRED_PLATFORM)}"
        )
    needed = REQUIRED_PLATFORM[implementation]
    if needed not in (None, platform) and not attention_kernels.interpreting():
        raise ValueError(
            f"ModelConfig.attention={implementation!r} needs a {needed.upper()} but this model "
            f"runs on {platform!r}; on {platform} use attention='xla'"
        )
    if needed is not None and seq_len is not None:
        attention_kernels.check_seq_len(implementation, seq_len)


def attend(
    implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """Causal attention within documents by ``implementation``, checked against the platform."""
    check_attention(implementation, target_platform(), q.shape[1])
    return _IMPLEMENTATIONS[implementation](q, k, v, segment_ids)


def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, query_segments: jax.Array, cache: KVCache
) -> jax.Array:
    """Attention of new queries over the cache, after writing their keys and values into it.

    The new tokens take the cache's next slots (the same slots in every row); a query sees the
    keys of its own document (segment id) in its slot or before, as the reference sees its row.
    """
    start = cache.index.value
    cache.keys.value = jax.lax.dynamic_update_slice_in_dim(cache.keys.value, k, start, axis=1)
    cache.values.value = jax.lax.dynamic_update_slice_in_dim(cache.values.value, v, start, axis=1)
    cache.segment_ids.value = jax.lax.dynamic_update_slice_in_dim(
        cache.segment_ids.value, query_segments, start, axis=1
    )
    cache.index.value = start + q.shape[1]
    query_slots = start + jnp.arange(q.shape[1])
    key_slots = jnp.arange(cache.keys.value.shape[1])
    same_document = query_segments[:, :, None] == cache.segment_ids.value[:, None, :]
    mask = same_document & (key_slots[None, None, :] <= query_slots[None, :, None])
    return jax.nn.dot_product_attention(q, cache.keys.value, cache.values.value, mask=mask[:, None])


class KVCache(NamedTuple):
    """One layer's cache variables: keys and values ``[b, slots, kv_heads, d]``, each slot's
    segment id ``[b, slots]`` (0 = never written, or padding) and the next free slot."""

    keys: nn.Variable
    values: nn.Variable
    segment_ids: nn.Variable
    index: nn.Variable


class Attention(nn.Module):
    config: ModelConfig
    decode: bool = False  # read and extend the key/value cache (sampling); see Transformer

    @nn.compact
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config
        q = self._project(x, cfg.num_heads, "heads", name="query")
        k = self._project(x, cfg.kv_heads, "kv_heads", name="key")
        v = self._project(x, cfg.kv_heads, "kv_heads", name="value")
        if cfg.positions == "rope":
            q = apply_rope(q, positions, theta=cfg.rope_theta)
            k = apply_rope(k, positions, theta=cfg.rope_theta)
        if self.decode:
            cache = self._cache(k, segment_ids)
            # init_cache only needs the cache's shapes: nothing is written then.
            out = q if self.is_initializing() else cached_attention(q, k, v, segment_ids, cache)
        else:
            # Init needs shapes only, from a one-token row no kernel can tile; the reference gives
            # them on any platform (so an AOT compile for TPU builds its layout on a CPU host).
            implementation = "xla" if self.is_initializing() else cfg.attention
            out = attend(implementation, q, k, v, segment_ids)
        out = constrain(out, *BATCH_LENGTH, "activation_heads", "activation_head_dim")
        out_axes = ("heads", "head_dim", "embed")
        return Dense(cfg, (cfg.d_model,), out_axes, contract=2, name="out")(out)

    def _cache(self, k: jax.Array, segment_ids: jax.Array) -> KVCache:
        """The cache variables, sized at init by the row length ``init_cache`` passes."""
        return KVCache(
            keys=self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype),
            values=self.variable("cache", "cached_value", jnp.zeros, k.shape, k.dtype),
            segment_ids=self.variable(
                "cache", "segment_ids", jnp.zeros, segment_ids.shape, jnp.int32
            ),
            index=self.variable("cache", "next_slot", jnp.zeros, (), jnp.int32),
        )

    def _project(self, x: jax.Array, num_heads: int, heads_axis: str, *, name: str) -> jax.Array:
        """``[b, l, embed] -> [b, l, num_heads, head_dim]``, constrained by logical names."""
        features = (num_heads, self.config.head_size)
        projected = Dense(self.config, features, ("embed", heads_axis, "head_dim"), name=name)(x)
        return constrain(
            projected, *BATCH_LENGTH, f"activation_{heads_axis}", "activation_head_dim"
        )
