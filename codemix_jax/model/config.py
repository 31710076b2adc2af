"""The transformer's hyper-parameters: one frozen, gin-configurable record, checked on creation."""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

_CHOICES = {
    "block": ("sequential", "parallel"),
    "mlp": ("swiglu", "gelu"),
    "norm": ("rmsnorm", "layernorm"),
    "positions": ("rope", "learned"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "attention": ("xla", "splash", "gpu_flash"),
}

_POSITIVE = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "d_ff",
    "max_seq_len",
    "rope_theta",
    "initializer_std",
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer dimensions and variants.

    Frozen (hence hashable) so that it can be a Linen module attribute and a jit static argument.
    """

    vocab_size: int = 1024
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (MHA); fewer = GQA (must divide num_heads)
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 256
    max_seq_len: int = 128
    block: str = "sequential"  # "sequential" (pre-LN) | "parallel" (attn + MLP on one normed input)
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    use_bias: bool = False  # biases in dense layers (and the layernorm bias)
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dtype: str = "float32"  # activation/compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True  # nn.scan over layers (params get a leading "layers" axis)
    remat: bool = False  # recompute each block in the backward pass to save memory
    # How attention scores are computed (the same function each way): "xla" (reference, any
    # platform, holds [b, heads, l, l] scores) | "splash" (TPU Pallas kernel) | "gpu_flash" (GPU
    # Pallas kernel); the kernels need seq_len % 128 == 0. See model/attention.py.
    attention: str = "xla"
    initializer_std: float = 0.02

    def __post_init__(self) -> None:
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: not in {choices}")
        for field in _POSITIVE:
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r} must be positive")
        for field in ("num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"ModelConfig.{field}={value!r} must be positive or None")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads!r} must divide "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model!r} is not divisible by "
                f"num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.positions == "rope" and self.head_size % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_size!r} must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after resolving the ``None`` (= MHA) default."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head width after resolving the ``None`` (= d_model // num_heads) default."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)
