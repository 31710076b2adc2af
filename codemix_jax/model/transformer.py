"""The decoder-only transformer: embeddings, blocks (scanned or unrolled), final norm, head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from codemix_jax.model.attention import Attention
from codemix_jax.model.config import ModelConfig
from codemix_jax.model.layers import (
    BATCH_LENGTH,
    Embed,
    Mlp,
    OutputHead,
    constrain,
    norm,
    vocab_logits,
)

EMBED_ACTIVATION = (*BATCH_LENGTH, "activation_embed")


class Block(nn.Module):
    """One layer: pre-LN ``sequential`` (attention, then MLP) or ``parallel`` (both on one norm).

    Takes and returns ``(x, None)`` so the same module is the body of ``nn.scan``.
    """

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, None]:
        cfg = self.config
        attention = Attention(cfg, decode=self.decode, name="attention")
        mlp = Mlp(cfg, name="mlp")
        if cfg.block == "parallel":
            normed = norm(cfg, name="norm")(x)
            x = x + attention(normed, segment_ids=segment_ids, positions=positions) + mlp(normed)
        else:
            normed = norm(cfg, name="attention_norm")(x)
            x = x + attention(normed, segment_ids=segment_ids, positions=positions)
            x = x + mlp(norm(cfg, name="mlp_norm")(x))
        return constrain(x, *EMBED_ACTIVATION), None


class Transformer(nn.Module):
    """Maps packed int32 ``tokens [b, l]`` to float32 next-token ``logits [b, l, vocab_size]``.

    ``segment_ids`` numbers the documents in a row (0 = padding) and ``positions`` restarts at 0 per
    document, so packed documents see exactly what they would see alone in a row.

    With ``head=False`` it stops before the output projection and returns ``(hidden, kernel)``: the
    final-normed hidden states ``[b, l, d_model]`` (compute dtype) and the projection
    ``[d_model, vocab_size]`` (the transposed tied embedding table or the untied head's kernel, in
    the param dtype), so that a loss can project a few tokens at a time (``model/loss.py``): at
    256K vocabulary and 8K tokens per row the full float32 logits are the step's largest buffer.

    With ``decode=True`` attention reads and extends a key/value cache (the ``cache`` collection,
    made by ``init_cache``): each call appends its tokens' keys and values after those of earlier
    calls, so a sampler feeds the prompt once, then one token per call.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array,
        positions: jax.Array,
        head: bool = True,
        decode: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        cfg = self.config
        self._check_inputs(tokens, segment_ids, positions)
        token_embedding = Embed(cfg, cfg.vocab_size, "vocab", name="token_embedding")
        x = token_embedding(tokens)
        if cfg.positions == "learned":
            x = x + Embed(cfg, cfg.max_seq_len, "position", name="position_embedding")(positions)
        x = self._blocks(constrain(x, *EMBED_ACTIVATION), segment_ids, positions, decode)
        x = norm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            kernel = token_embedding.embedding.T
        else:
            kernel = OutputHead(cfg, name="output_head").kernel
        if not head:
            return x, kernel
        return constrain(vocab_logits(x, kernel), *BATCH_LENGTH, "activation_vocab")

    def _blocks(
        self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array, decode: bool
    ) -> jax.Array:
        cfg = self.config
        block = nn.remat(Block, prevent_cse=not cfg.scan_layers) if cfg.remat else Block
        if not cfg.scan_layers:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, decode=decode, name=f"layers_{i}")(x, segment_ids, positions)
            return x
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(cfg, decode=decode, name="layers")(x, segment_ids, positions)
        return x

    def _check_inputs(
        self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array
    ) -> None:
        if tokens.ndim != 2 or segment_ids.shape != tokens.shape or positions.shape != tokens.shape:
            raise ValueError(
                f"tokens, segment_ids and positions must share one [batch, length] shape; got "
                f"{tokens.shape}, {segment_ids.shape}, {positions.shape}"
            )
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}"
            )


def init_params(model: Transformer, rng: jax.Array) -> dict:
    """Fresh parameters, still boxed with their logical axis names.

    Initialised from a one-token input: no parameter's shape depends on the input length.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, segment_ids=tokens + 1, positions=tokens)["params"]


def init_cache(model: Transformer, batch_size: int, length: int) -> dict:
    """An empty key/value cache for ``batch_size`` rows of up to ``length`` tokens (zeros; made
    from shapes alone, no forward pass runs)."""
    tokens = jnp.zeros((batch_size, length), jnp.int32)

    def cache() -> dict:
        variables = model.init(
            jax.random.key(0), tokens, segment_ids=tokens, positions=tokens, decode=True
        )
        return variables["cache"]

    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(cache))
