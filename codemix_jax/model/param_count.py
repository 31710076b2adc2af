"""Parameter counts of a configuration, derived from the model itself without allocating it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from codemix_jax.model.config import ModelConfig
from codemix_jax.model.transformer import Transformer

EMBEDDING_MODULES = ("token_embedding", "position_embedding")


def abstract_params(config: ModelConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves: shapes only, so 2.8B costs nothing."""

    def init() -> dict:
        tokens = jnp.zeros((1, 1), jnp.int32)
        model = Transformer(config)
        variables = model.init(jax.random.key(0), tokens, segment_ids=tokens + 1, positions=tokens)
        return nn.unbox(variables["params"])

    return jax.eval_shape(init)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """``total``, ``embedding`` (token + position tables, a tied head counted once) and the rest."""
    params = abstract_params(config)
    total = _size(params)
    embedding = sum(_size(params[name]) for name in EMBEDDING_MODULES if name in params)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
