"""Log-likelihood of continuations given contexts, batched on the mesh: how both papers score their
natural-language tasks zero-shot, and what lm-evaluation-harness computes on an export.

A request is a pair of token lists (context, continuation). The pair is split the way
lm-evaluation-harness splits it (``split_pair``), so that the numbers here and lm-eval's on the
exported model are the same quantity.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import linen as nn
from jax.sharding import Mesh

from codemix_jax import sharding
from codemix_jax.eval.batch_shape import padded_length, padded_rows
from codemix_jax.model import Transformer

Request = tuple[Sequence[int], Sequence[int]]


def split_pair(vocab: seqio.Vocabulary, context: str, continuation: str) -> Request:
    """Token ids of ``context`` and of ``continuation`` after it.

    The whole text is encoded once and the continuation is what follows the context's own
    encoding, so a piece that spans the boundary is not split; trailing whitespace of the context
    moves to the continuation first. This is lm-evaluation-harness's rule for Hugging Face models.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = vocab.encode(context + continuation)
    context_ids = vocab.encode(context)
    return context_ids, whole[len(context_ids) :]


class LoglikelihoodScorer:
    """Sums of the continuation tokens' log-probabilities under ``params`` of ``model``."""

    def __init__(
        self, *, model: Transformer, params: Any, mesh: Mesh, rules: sharding.Rules, rows: int = 16
    ):
        self.model = model
        self.params = params
        self.mesh = mesh
        self.rules = rules
        self.rows = padded_rows(rows, mesh)

    def loglikelihoods(self, requests: Sequence[Request]) -> list[float]:
        """One float per request: log p(continuation | context), natural log.

        A pair longer than the model's context keeps its end (the continuation and as much of
        the context as fits), as lm-eval does.
        """
        rows = [self._row(context, continuation) for context, continuation in requests]
        scores: list[float] = []
        for start in range(0, len(rows), self.rows):
            scores.extend(self._batch(rows[start : start + self.rows]))
        return scores

    def _row(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], int]:
        if not continuation:
            raise ValueError("a continuation must have at least one token")
        if not context:
            raise ValueError("a context must have at least one token")
        tokens = [*context, *continuation][-(self.model.config.max_seq_len + 1) :]
        return tokens, len(continuation)

    def _batch(self, rows: list[tuple[list[int], int]]) -> list[float]:
        longest = max(len(tokens) - 1 for tokens, _ in rows)
        length = padded_length(longest, self.model.config.max_seq_len)
        batch = {name: np.zeros((self.rows, length), np.int32) for name in _FIELDS}
        weights = np.zeros((self.rows, length), np.float32)
        for i, (tokens, scored) in enumerate(rows):
            n = len(tokens) - 1
            batch["inputs"][i, :n] = tokens[:-1]
            batch["targets"][i, :n] = tokens[1:]
            batch["segment_ids"][i, :n] = 1
            batch["positions"][i, :n] = np.arange(n)
            weights[i, n - scored : n] = 1.0
        batch = {name: self._on_mesh(array) for name, array in {**batch, "w": weights}.items()}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            sums = _continuation_logprob(self.model, self.params, batch)
        return np.asarray(jax.device_get(sums))[: len(rows)].tolist()

    def _on_mesh(self, array: np.ndarray) -> jax.Array:
        return jax.device_put(array, sharding.batch_sharding(self.mesh, array.ndim))


_FIELDS = ("inputs", "targets", "segment_ids", "positions")


@functools.partial(jax.jit, static_argnums=0)
def _continuation_logprob(model: Transformer, params: Any, batch: dict[str, jax.Array]):
    """``[b]`` sums of log p(target) over the positions ``batch["w"]`` marks, in float32."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logprobs, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(target * batch["w"], axis=-1)
