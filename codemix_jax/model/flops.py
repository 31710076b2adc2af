"""Model FLOPs per trained token, the numerator of MFU."""

from __future__ import annotations

import math

import jax

from codemix_jax.model.config import ModelConfig
from codemix_jax.model.param_count import abstract_params


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token, as in PaLM (Chowdhery et al. 2022, appendix B).

    ``6 * N + 12 * num_layers * seq_len * num_heads * head_dim`` where ``N`` counts the parameters
    that take part in a matmul: every dense kernel plus the output head (the embedding table when
    tied). Embedding lookups, norms and biases are not matmuls and are left out. The attention
    term counts the full (not causally halved) score and value products over ``seq_len``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be positive")
    matmul_params = sum(
        math.prod(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(config))
        if path[-1].key == "kernel"
    )
    if config.tie_embeddings:
        matmul_params += config.vocab_size * config.d_model
    attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_size
    return float(6 * matmul_params + attention)
