"""Flax Linen decoder-only transformer, its configuration, parameter count and FLOPs per token."""

from codemix_jax.model.config import ModelConfig
from codemix_jax.model.flops import training_flops_per_token
from codemix_jax.model.param_count import count_parameters
from codemix_jax.model.transformer import Transformer, init_params

__all__ = [
    "ModelConfig",
    "Transformer",
    "count_parameters",
    "init_params",
    "training_flops_per_token",
]
