"""Parameter counts of a configuration, derived from the model itself without allocating it."""

from __future__ import annotations

import math

import jax
from flax import linen as nn

from codemix_jax.model.config import ModelConfig
from codemix_jax.model.transformer import Transformer, init_params

EMBEDDING_MODULES = ("token_embedding", "position_embedding")


def abstract_params(config: ModelConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves: shapes only, so 2.8B costs nothing."""

    return jax.eval_shape(lambda: nn.unbox(init_params(Transformer(config), jax.random.key(0))))


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """``total``, ``embedding`` (token + position tables, a tied head counted once) and the rest."""
    params = abstract_params(config)
    total = _size(params)
    embedding = sum(_size(params[name]) for name in EMBEDDING_MODULES if name in params)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
