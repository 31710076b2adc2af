"""Sampling with a key/value cache: greedy, temperature and top-p; batched, jitted, on the mesh.

Prompts of different lengths are left-padded into one batch: padding is segment 0 and the prompt
segment 1, so no prompt token attends to padding, and each row's positions start at 0 at its
first real token, as in training. The prompt is fed once, then one token per step, each step
reading the cache (model/attention.py ``cached_attention``); a row stops at EOS, the batch when
every row has stopped or reached ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import linen as nn
from jax.sharding import Mesh

from codemix_jax import sharding
from codemix_jax.data import load_vocab
from codemix_jax.eval.batch_shape import padded_length, padded_rows
from codemix_jax.model import Transformer
from codemix_jax.model.transformer import init_cache
from codemix_jax.trained import TrainedModel

log = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How each next token is chosen.

    Attributes:
      max_new_tokens: tokens generated after the prompt at most (fewer if EOS comes first).
      temperature: 0 = greedy (argmax); else logits are divided by it before sampling.
      top_p: sample from the smallest set of tokens whose probability reaches this (nucleus);
        1 = the whole vocabulary.
      seed: the sampling key's seed; the same seed and prompts give the same samples.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def top_p_filtered(logits: jax.Array, top_p: float) -> jax.Array:
    """``logits [b, vocab]`` with every token outside the nucleus set to -inf: the most likely
    tokens whose probabilities, in order, first reach ``top_p`` (the first token always stays)."""
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(descending, kept - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def next_token(logits: jax.Array, key: jax.Array, settings: SamplingSettings) -> jax.Array:
    """The next token of each row from its float32 ``logits [b, vocab]``."""
    if settings.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / settings.temperature
    if settings.top_p < 1:
        logits = top_p_filtered(logits, settings.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_padded(prompts: Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
    """The prompts as a ``[len(prompts), length]`` decoder input, each aligned to the right."""
    batch = {name: np.zeros((len(prompts), length), np.int32) for name in _INPUTS}
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        batch["tokens"][row, start:] = prompt
        batch["segment_ids"][row, start:] = 1
        batch["positions"][row, start:] = np.arange(len(prompt))
    return batch


_INPUTS = ("tokens", "segment_ids", "positions")


class Sampler:
    """Generates continuations from ``params`` of ``model`` laid out on ``mesh``.

    ``vocab_size`` is the tokenizer's size: a model's embedding may have padding rows past it
    (40192 rows for a 40000-piece vocabulary), which are never sampled. Prompts are generated
    ``batch_rows`` at a time (rounded up to a multiple of the mesh's data x fsdp size).
    """

    def __init__(
        self,
        *,
        model: Transformer,
        params: Any,
        mesh: Mesh,
        rules: sharding.Rules,
        vocab_size: int,
        batch_rows: int = 32,
    ):
        self.model = model
        self.params = params
        self.mesh = mesh
        self.rules = rules
        self.vocab_size = vocab_size
        self.batch_rows = padded_rows(batch_rows, mesh)

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings
    ) -> list[list[int]]:
        """The new tokens of each prompt, up to and without EOS.

        A prompt longer than the model's context leaves its first tokens out, keeping room for
        ``max_new_tokens``; a warning says how many prompts lost tokens.
        """
        if not prompts:
            return []
        room = self.model.config.max_seq_len - settings.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in "
                f"max_seq_len={self.model.config.max_seq_len}"
            )
        if any(not prompt for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        if cut := sum(len(prompt) > room for prompt in prompts):
            log.warning("%d prompt(s) longer than %d tokens lost their beginning", cut, room)
        prompts = [list(prompt)[-room:] for prompt in prompts]
        generated = []
        for start in range(0, len(prompts), self.batch_rows):
            generated.extend(self._batch(prompts[start : start + self.batch_rows], settings))
        return generated

    def _batch(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        """At most ``batch_rows`` prompts, padded to the batch's rows and a bucketed length."""
        longest = max(len(prompt) for prompt in prompts)
        room = self.model.config.max_seq_len - settings.max_new_tokens
        length = padded_length(longest, room)
        rows = padded_rows(len(prompts), self.mesh)
        batch = left_padded(prompts + [[EOS_ID]] * (rows - len(prompts)), length)
        new_tokens = self._run(batch, settings)
        return [_until_eos(row) for row in new_tokens[: len(prompts)]]

    def complete(
        self, texts: Sequence[str], settings: SamplingSettings, vocab: seqio.Vocabulary
    ) -> list[str]:
        """Text in, text out: each prompt's continuation, decoded."""
        tokens = self.generate([vocab.encode(text) for text in texts], settings)
        return [vocab.decode(row) for row in tokens]

    def _run(self, batch: dict[str, np.ndarray], settings: SamplingSettings) -> np.ndarray:
        inputs = {
            name: jax.device_put(array, sharding.batch_sharding(self.mesh, 2))
            for name, array in batch.items()
        }
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            new_tokens = _sample(
                self.model, settings, self.vocab_size, self.params, inputs, settings.seed
            )
        return np.asarray(jax.device_get(new_tokens))


def _until_eos(row: np.ndarray) -> list[int]:
    ends = np.flatnonzero(row == EOS_ID)
    return row[: ends[0] if ends.size else len(row)].tolist()


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(
    model: Transformer,
    settings: SamplingSettings,
    vocab_size: int,
    params: Any,
    inputs: dict[str, jax.Array],
    seed: int,
) -> jax.Array:
    """``[b, max_new_tokens]`` new tokens; after a row's EOS, padding."""
    rows, length = inputs["tokens"].shape
    cache = init_cache(model, rows, length + settings.max_new_tokens)

    def forward(cache: dict, tokens, segment_ids, positions) -> tuple[jax.Array, dict]:
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            decode=True,
            mutable=["cache"],
        )
        last = logits[:, -1, :]
        return jnp.where(jnp.arange(last.shape[-1]) < vocab_size, last, -jnp.inf), variables[
            "cache"
        ]

    logits, cache = forward(cache, **inputs)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "cache": cache,
        "logits": logits,
        "position": inputs["positions"][:, -1] + 1,
        "done": jnp.zeros((rows,), bool),
        "out": jnp.full((rows, settings.max_new_tokens), PAD_ID, jnp.int32),
        "key": jax.random.key(seed),
    }

    def running(state: dict) -> jax.Array:
        return (state["step"] < settings.max_new_tokens) & ~jnp.all(state["done"])

    def step(state: dict) -> dict:
        key, sample_key = jax.random.split(state["key"])
        token = next_token(state["logits"], sample_key, settings)
        token = jnp.where(state["done"], PAD_ID, token)
        logits, cache = forward(
            state["cache"],
            token[:, None],
            jnp.ones((rows, 1), jnp.int32),
            state["position"][:, None],
        )
        return {
            "step": state["step"] + 1,
            "cache": cache,
            "logits": logits,
            "position": state["position"] + 1,
            "done": state["done"] | (token == EOS_ID),
            "out": state["out"].at[:, state["step"]].set(token),
            "key": key,
        }

    return jax.lax.while_loop(running, step, state)["out"]


def sampler_for(trained: TrainedModel) -> Sampler:
    """A sampler over a trained checkpoint, restricted to its vocabulary's ids."""
    return Sampler(
        model=trained.model,
        params=trained.params,
        mesh=trained.mesh,
        rules=trained.rules,
        vocab_size=load_vocab(trained.vocab_path).vocab_size,
    )
