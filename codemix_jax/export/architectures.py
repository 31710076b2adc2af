"""Which transformers architecture computes exactly the function a ModelConfig computes, and
where each saved array goes in it.

Three targets cover the grid's variants: ``LlamaForCausalLM`` (sequential blocks, RMSNorm, SwiGLU,
RoPE), ``CohereForCausalLM`` (paper A: parallel blocks, bias-free LayerNorm, SwiGLU, RoPE) and
``GPT2LMHeadModel`` (PanGu/GPT: sequential blocks, LayerNorm, GELU, learned positions). A config
that no target computes exactly is refused with, per target, the fields that differ: an export
is never an approximation. Each target's layout was checked against transformers 5.23's source:

- every target scales attention scores by ``head_dim ** -0.5`` and has pre-norm residual blocks;
  the RoPE ones use the JAX model's frequencies ``theta ** (-2i / head_dim)``;
- Llama rotates halves (``rotate_half``), as ``apply_rope`` does; Cohere rotates interleaved
  pairs, so its query and key columns are reordered per head (q.k is unchanged when both get the
  same order), and its logits are multiplied by ``logit_scale`` (set to 1);
- GPT-2's ``Conv1D`` weights are ``[in, out]`` (the JAX layout), its q, k and v are one fused
  ``c_attn``, its ``gelu_new`` is the tanh approximation flax's ``nn.gelu`` computes, and its
  Conv1D and LayerNorm biases always exist: zeros where the JAX model has none are the same
  function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from codemix_jax.model import ModelConfig
from codemix_jax.model.layers import norm


class UnsupportedArchitectureError(ValueError):
    """A ModelConfig that no transformers architecture computes exactly."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One exported tensor (per layer when ``name`` holds ``{i}``) made from saved arrays.

    ``sources`` are param paths (``attention/query/kernel``), relative to the layer for a layer
    rule; ``convert`` takes their arrays, in order, and returns the tensor in the target's layout.
    """

    name: str
    sources: tuple[str, ...]
    convert: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


@dataclasses.dataclass(frozen=True)
class Target:
    """A transformers architecture, its config and where every saved array goes."""

    architecture: str  # the model class, e.g. "LlamaForCausalLM"
    config_class: str  # its config class in transformers
    config: dict  # the config class's arguments, less the tokenizer's ids
    rules: tuple[Rule, ...]

    def saved_paths(self, model: ModelConfig) -> set[str]:
        """Every saved param path the rules read: one stacked array per layer rule source with
        scanned layers, one per layer otherwise."""
        paths = set()
        for rule in self.rules:
            if not rule.per_layer:
                paths.update(rule.sources)
            elif model.scan_layers:
                paths.update(f"layers/{source}" for source in rule.sources)
            else:
                paths.update(
                    f"layers_{i}/{source}"
                    for i in range(model.num_layers)
                    for source in rule.sources
                )
        return paths


# The variant fields, which decide the function's shape; each target computes one combination.
_VARIANT_FIELDS = ("block", "norm", "mlp", "positions")


def target_for(config: ModelConfig) -> Target:
    """The architecture computing exactly ``config``'s function; refused, naming for each one
    the ModelConfig fields that differ, when there is none."""
    differences = {}
    for architecture, candidate in _TARGETS.items():
        found = [
            f"{field}={getattr(config, field)!r} (needs {wanted!r})"
            for field, wanted in zip(_VARIANT_FIELDS, candidate.variant, strict=True)
            if getattr(config, field) != wanted
        ]
        found += list(candidate.constraints(config))
        if not found:
            return candidate.build(config)
        differences[architecture] = found
    detail = "; ".join(f"{name}: {', '.join(found)}" for name, found in differences.items())
    raise UnsupportedArchitectureError(
        f"no transformers architecture computes this model's function exactly, so it is not "
        f"exported ({detail})"
    )


def norm_epsilon(config: ModelConfig) -> float:
    """The epsilon the model's norms use, read from the model's own norm layer."""
    return norm(config, name="probe").epsilon


def rope_parameters(config: ModelConfig) -> dict:
    return {"rope_type": "default", "rope_theta": float(config.rope_theta)}


# Array conversions from the JAX layout (kernels [in..., out...]) to a target's.


def linear(kernel: np.ndarray, inputs: int = 1) -> np.ndarray:
    """A kernel ``[in..., out...]`` with ``inputs`` input axes as torch ``Linear.weight``:
    ``[out, in]``, the axes of each side flattened."""
    return conv1d(kernel, inputs).T


def conv1d(kernel: np.ndarray, inputs: int = 1) -> np.ndarray:
    """A kernel as GPT-2's ``Conv1D.weight``: ``[in, out]``, the axes of each side flattened."""
    return kernel.reshape(math.prod(kernel.shape[:inputs]), -1)


def flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1)


def same(array: np.ndarray) -> np.ndarray:
    return array


def interleaved(kernel: np.ndarray) -> np.ndarray:
    """Reorders a projection's last axis (head_dim) from rotate-half pairs ``(j, j + d/2)`` to
    interleaved pairs ``(2j, 2j + 1)``: Cohere's RoPE then rotates the same pairs by the same
    angles, and the scores, sums over the reordered dims of both q and k, are unchanged."""
    half = kernel.shape[-1] // 2
    order = np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)
    return kernel[..., order]


def zeros(shape: tuple[int, ...], config: ModelConfig) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(shape, config.weight_dtype)


def _head(config: ModelConfig, name: str) -> Iterator[Rule]:
    """The untied output projection ``[d_model, vocab]`` as ``Linear.weight`` (the tied one is the
    embedding table the target ties it to)."""
    if not config.tie_embeddings:
        yield Rule(name, ("output_head/kernel",), linear)


def _swiglu_rules(config: ModelConfig, prefix: str, rope_order: Callable) -> Iterator[Rule]:
    """Llama's and Cohere's attention and SwiGLU projections (``act(gate) * up``, then down);
    ``rope_order`` lays out the head_dim axis of queries and keys as the target's RoPE pairs it."""
    projections = [
        ("self_attn.q_proj", "attention/query", rope_order),
        ("self_attn.k_proj", "attention/key", rope_order),
        ("self_attn.v_proj", "attention/value", same),
        ("self_attn.o_proj", "attention/out", same),
        ("mlp.gate_proj", "mlp/wi_gate", same),
        ("mlp.up_proj", "mlp/wi", same),
        ("mlp.down_proj", "mlp/wo", same),
    ]
    for name, source, order in projections:
        inputs = 2 if source == "attention/out" else 1
        yield Rule(
            f"{prefix}.{name}.weight",
            (f"{source}/kernel",),
            lambda k, o=order, n=inputs: linear(o(k), inputs=n),
        )
        if config.use_bias:
            yield Rule(f"{prefix}.{name}.bias", (f"{source}/bias",), lambda b, o=order: flat(o(b)))


def _llama_constraints(config: ModelConfig) -> Iterator[str]:
    if config.d_model % config.num_heads:
        yield (
            f"d_model={config.d_model} is not a multiple of num_heads={config.num_heads} "
            "(LlamaConfig refuses that even with head_dim set)"
        )


def _llama(config: ModelConfig) -> Target:
    layer = "model.layers.{i}"
    rules = [
        Rule("model.embed_tokens.weight", ("token_embedding/embedding",), same),
        Rule("model.norm.weight", ("final_norm/scale",), same),
        *_head(config, "lm_head.weight"),
        Rule(f"{layer}.input_layernorm.weight", ("attention_norm/scale",), same),
        Rule(f"{layer}.post_attention_layernorm.weight", ("mlp_norm/scale",), same),
        *_swiglu_rules(config, layer, rope_order=same),
    ]
    return Target(
        architecture="LlamaForCausalLM",
        config_class="LlamaConfig",
        config={
            **_decoder_dimensions(config),
            "head_dim": config.head_size,
            "hidden_act": "silu",
            "rms_norm_eps": norm_epsilon(config),
            "rope_parameters": rope_parameters(config),
            "attention_bias": config.use_bias,
            "mlp_bias": config.use_bias,
        },
        rules=tuple(rules),
    )


def _cohere_constraints(config: ModelConfig) -> Iterator[str]:
    if config.use_bias:
        yield "use_bias=True (Cohere's LayerNorm and MLP have no biases)"


def _cohere(config: ModelConfig) -> Target:
    layer = "model.layers.{i}"
    rules = [
        Rule("model.embed_tokens.weight", ("token_embedding/embedding",), same),
        Rule("model.norm.weight", ("final_norm/scale",), same),
        *_head(config, "lm_head.weight"),
        Rule(f"{layer}.input_layernorm.weight", ("norm/scale",), same),
        *_swiglu_rules(config, layer, rope_order=interleaved),
    ]
    return Target(
        architecture="CohereForCausalLM",
        config_class="CohereConfig",
        config={
            **_decoder_dimensions(config),
            # Not a CohereConfig field, but CohereAttention and its RoPE read it when present.
            "head_dim": config.head_size,
            "hidden_act": "silu",
            "layer_norm_eps": norm_epsilon(config),
            "rope_parameters": rope_parameters(config),
            "logit_scale": 1.0,
            "use_qk_norm": False,
            "attention_bias": False,
        },
        rules=tuple(rules),
    )


def _gpt2_constraints(config: ModelConfig) -> Iterator[str]:
    if config.kv_heads != config.num_heads:
        yield f"num_kv_heads={config.num_kv_heads} (GPT-2 has no grouped-query attention)"
    if config.d_model % config.num_heads or config.head_size != config.d_model // config.num_heads:
        yield (
            f"head_dim={config.head_size} (GPT-2's is d_model / num_heads = "
            f"{config.d_model / config.num_heads:g})"
        )


def _gpt2(config: ModelConfig) -> Target:
    d, layer = config.d_model, "transformer.h.{i}"

    def bias(name: str, sources: tuple[str, ...], size: int) -> Rule:
        """The saved biases, concatenated, or zeros of ``size`` where the model has none."""
        if config.use_bias:
            return Rule(name, sources, lambda *b: np.concatenate([flat(x) for x in b]))
        return Rule(name, (), zeros((size,), config))

    def norm_rules(name: str, source: str) -> list[Rule]:
        return [
            Rule(f"{name}.weight", (f"{source}/scale",), same),
            bias(f"{name}.bias", (f"{source}/bias",), d),
        ]

    qkv = tuple(f"attention/{p}" for p in ("query", "key", "value"))
    rules = [
        Rule("transformer.wte.weight", ("token_embedding/embedding",), same),
        Rule("transformer.wpe.weight", ("position_embedding/embedding",), same),
        *norm_rules("transformer.ln_f", "final_norm"),
        *_head(config, "lm_head.weight"),
        *norm_rules(f"{layer}.ln_1", "attention_norm"),
        *norm_rules(f"{layer}.ln_2", "mlp_norm"),
        Rule(
            f"{layer}.attn.c_attn.weight",
            tuple(f"{p}/kernel" for p in qkv),
            lambda *kernels: np.concatenate([conv1d(k) for k in kernels], axis=1),
        ),
        bias(f"{layer}.attn.c_attn.bias", tuple(f"{p}/bias" for p in qkv), 3 * d),
        Rule(f"{layer}.attn.c_proj.weight", ("attention/out/kernel",), lambda k: conv1d(k, 2)),
        bias(f"{layer}.attn.c_proj.bias", ("attention/out/bias",), d),
        Rule(f"{layer}.mlp.c_fc.weight", ("mlp/wi/kernel",), conv1d),
        bias(f"{layer}.mlp.c_fc.bias", ("mlp/wi/bias",), config.d_ff),
        Rule(f"{layer}.mlp.c_proj.weight", ("mlp/wo/kernel",), conv1d),
        bias(f"{layer}.mlp.c_proj.bias", ("mlp/wo/bias",), d),
    ]
    return Target(
        architecture="GPT2LMHeadModel",
        config_class="GPT2Config",
        config={
            "vocab_size": config.vocab_size,
            "n_embd": d,
            "n_layer": config.num_layers,
            "n_head": config.num_heads,
            "n_inner": config.d_ff,
            "n_positions": config.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": norm_epsilon(config),
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            # The JAX model has no dropout; zero keeps the two alike when the export is trained.
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": config.tie_embeddings,
        },
        rules=tuple(rules),
    )


def _decoder_dimensions(config: ModelConfig) -> dict:
    """The Llama-family config fields every RoPE target shares."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": config.max_seq_len,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
    }


@dataclasses.dataclass(frozen=True)
class _Candidate:
    variant: tuple[str, ...]  # the values of _VARIANT_FIELDS it computes
    constraints: Callable[[ModelConfig], Iterator[str]]  # what else it cannot express, in words
    build: Callable[[ModelConfig], Target]


_TARGETS = {
    "LlamaForCausalLM": _Candidate(
        ("sequential", "rmsnorm", "swiglu", "rope"), _llama_constraints, _llama
    ),
    "CohereForCausalLM": _Candidate(
        ("parallel", "layernorm", "swiglu", "rope"), _cohere_constraints, _cohere
    ),
    "GPT2LMHeadModel": _Candidate(
        ("sequential", "layernorm", "gelu", "learned"), _gpt2_constraints, _gpt2
    ),
}
