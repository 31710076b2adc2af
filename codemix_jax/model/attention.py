"""Causal self-attention that never crosses a packed-document boundary (MHA/GQA, RoPE or none)."""

from __future__ import annotations

import jax
from flax import linen as nn

from codemix_jax.model.config import ModelConfig
from codemix_jax.model.layers import BATCH_LENGTH, Dense, apply_rope, constrain


def document_mask(segment_ids: jax.Array) -> jax.Array:
    """``[b, 1, l, l]`` True where query and key are in the same document and not padding (id 0).

    Causality is added by the attention call; together they keep packed documents independent.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, :, None]
    return (same & real)[:, None]


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config
        q = self._project(x, cfg.num_heads, "heads", name="query")
        k = self._project(x, cfg.kv_heads, "kv_heads", name="key")
        v = self._project(x, cfg.kv_heads, "kv_heads", name="value")
        if cfg.positions == "rope":
            q = apply_rope(q, positions, theta=cfg.rope_theta)
            k = apply_rope(k, positions, theta=cfg.rope_theta)
        # Softmax runs in float32 inside dot_product_attention; GQA groups are handled there too.
        out = jax.nn.dot_product_attention(q, k, v, mask=document_mask(segment_ids), is_causal=True)
        out = constrain(out, *BATCH_LENGTH, "activation_heads", "activation_head_dim")
        out_axes = ("heads", "head_dim", "embed")
        return Dense(cfg, (cfg.d_model,), out_axes, contract=2, name="out")(out)

    def _project(self, x: jax.Array, num_heads: int, heads_axis: str, *, name: str) -> jax.Array:
        """``[b, l, embed] -> [b, l, num_heads, head_dim]``, constrained by logical names."""
        features = (num_heads, self.config.head_size)
        projected = Dense(self.config, features, ("embed", heads_axis, "head_dim"), name=name)(x)
        return constrain(
            projected, *BATCH_LENGTH, f"activation_{heads_axis}", "activation_head_dim"
        )
