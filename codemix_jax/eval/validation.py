"""Per-source validation in the training loop: loss and bits per byte on held-out rows.

The papers ask how code in the mixture moves the loss on text (and the reverse), so every source
of the run with a validation split is measured, whatever its share, on the same rows each time:
its split's first ``Validation.rows`` packed rows, packed by the training Task and read once. The
scoring is the training loss (``token_losses``: full or chunked logits, the loss weights that
keep an instruction example's prompt out), on the training mesh. Bits per byte divide the nats by
ln 2 and by the UTF-8 bytes of the scored tokens, so runs with different vocabularies compare.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from codemix_jax import sharding
from codemix_jax.data import MixtureInput, Source, load_vocab
from codemix_jax.data.packing import LOSS_WEIGHTS
from codemix_jax.model.loss import loss_weights, token_losses
from codemix_jax.train_state import TrainProgram, global_batch

log = logging.getLogger(__name__)

Rows = dict[str, np.ndarray]
ROW_FEATURES = ("inputs", "targets", "segment_ids", "positions", LOSS_WEIGHTS)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Validation:
    """When and on how much held-out data ``train`` measures each source.

    Attributes:
      every: measure after every step that is a multiple of this.
      rows: packed rows (of the run's ``seq_len``) per source: the first ones of its validation
        split in file order. A split with fewer is used whole.
      batch_size: rows per evaluation step over all processes; None = the training batch. A
        multiple of the data x fsdp mesh size and of the process count.
    """

    every: int = 1000
    rows: int = 64
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("every", "rows", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Validation.{name} must be >= 1, got {value}")


class Validator:
    """Measures params on every validated source's rows (the loop's ``metrics.Evaluation``).

    Cheap to build: the rows are read, and the step compiled, at the first evaluation.
    """

    def __init__(self, config: Validation, *, program: TrainProgram, dataset: MixtureInput):
        self._config, self._program, self._dataset = config, program, dataset
        self._sources = _validated_sources(dataset.sources)
        self._batch_size = config.batch_size or dataset.global_batch_size
        _check_batch_size(self._batch_size, program)
        self._step = _eval_step(program, num_sources=len(self._sources))

    def due(self, step: int) -> bool:
        return bool(self._sources) and step % self._config.every == 0

    def run(self, step: int, params: Any) -> dict[str, float]:
        """``val/<source>/{loss,bpb}`` and, over all sources' rows, ``val/{loss,bpb}``."""
        start = time.perf_counter()
        sums = jax.device_get([self._step(params, batch) for batch in self._batches])
        nats = np.sum([s["nats"] for s in sums], axis=0, dtype=np.float64)
        tokens = np.sum([s["tokens"] for s in sums], axis=0, dtype=np.float64)
        scalars = _scalars(list(self.rows), nats=nats, tokens=tokens, num_bytes=self._bytes)
        log.info(
            "validation at step %d (%.1f s): %s", step, time.perf_counter() - start, _brief(scalars)
        )
        return scalars

    @functools.cached_property
    def rows(self) -> dict[str, Rows]:
        """Source name -> its rows (every process reads them all): the same at every evaluation."""
        rows = {}
        for index, source in enumerate(self._sources):
            rows[source.name] = _read_rows(source, index, self._dataset, self._config.rows)
            if (count := len(rows[source.name]["targets"])) < self._config.rows:
                log.warning(
                    "validation: %s has %d rows of %d tokens, not %d; all of them are measured",
                    *(source.name, count, self._dataset.seq_len, self._config.rows),
                )
        return rows

    @functools.cached_property
    def _batches(self) -> list[dict[str, jax.Array]]:
        """All sources' rows, padded with zero-weight rows to whole batches, on the mesh; each
        process gives its slice of every batch, as in training."""
        rows = {
            k: np.concatenate([r[k] for r in self.rows.values()])
            for k in (*ROW_FEATURES, "source_id")
        }
        total = len(rows["targets"])
        padded = {k: _pad(v, -total % self._batch_size) for k, v in rows.items()}
        per_process = self._batch_size // jax.process_count()
        first = jax.process_index() * per_process
        return [
            global_batch(
                {k: v[start + first : start + first + per_process] for k, v in padded.items()},
                self._program.mesh,
            )
            for start in range(0, total, self._batch_size)
        ]

    @functools.cached_property
    def _bytes(self) -> np.ndarray:
        """UTF-8 bytes of each source's scored target tokens."""
        table = token_bytes(self._dataset.vocab_path)
        return np.array(
            [(table[r["targets"]] * np.asarray(loss_weights(r))).sum() for r in self.rows.values()]
        )


def token_bytes(vocab_path: str) -> np.ndarray:
    """``[vocab]`` UTF-8 bytes each token id stands for in decoded text.

    '▁' is a space; a byte-fallback piece ``<0xNN>`` is one byte; control pieces (pad, EOS) and
    ``<unk>`` (whose text is not known) are none. Bytes are of the normalized text, which is the
    text itself under the identity normalization of our vocabularies.
    """
    processor = load_vocab(vocab_path).tokenizer
    table = np.zeros(processor.get_piece_size(), np.int64)
    for piece_id in range(len(table)):
        if processor.is_byte(piece_id):
            table[piece_id] = 1
        elif not (processor.is_control(piece_id) or processor.is_unknown(piece_id)):
            table[piece_id] = len(processor.id_to_piece(piece_id).replace("▁", " ").encode())
    return table


def _validated_sources(sources: list[Source]) -> list[Source]:
    """The sources with a validation split (their files checked now), the others named once."""
    if skipped := [source.name for source in sources if source.validation is None]:
        log.warning("validation: no validation split, not measured: %s", ", ".join(skipped))
    kept = [source for source in sources if source.validation is not None]
    for source in kept:
        source.require_files("validation")
    return kept


def _check_batch_size(batch_size: int, program: TrainProgram) -> None:
    data_parallel = math.prod(program.mesh.shape[axis] for axis in sharding.BATCH_AXES)
    processes = jax.process_count()
    if batch_size % data_parallel or batch_size % processes:
        raise ValueError(
            f"Validation.batch_size={batch_size} must be a multiple of the data x fsdp mesh size "
            f"{data_parallel} and of the process count {processes}"
        )


def _read_rows(source: Source, index: int, dataset: MixtureInput, count: int) -> Rows:
    """The first ``count`` rows of ``source``'s validation split, packed as in training."""
    rows = source.task(vocab_path=dataset.vocab_path).get_dataset(
        sequence_length={"targets": dataset.seq_len},
        split="validation",
        shuffle=False,
        num_epochs=1,
    )
    read = list(rows.take(count).as_numpy_iterator())
    # A document's rows carry no loss weights: every token weighs 1. (Reshaped: there may be none.)
    stacked = {
        name: np.array(
            [row.get(name, np.ones_like(row["targets"])) for row in read], np.int32
        ).reshape(len(read), dataset.seq_len)
        for name in ROW_FEATURES
    }
    return {**stacked, "source_id": np.full(len(read), index, np.int32)}


def _pad(values: np.ndarray, count: int) -> np.ndarray:
    """``count`` more rows of zeros: segment 0 is padding, which weighs nothing."""
    return np.concatenate([values, np.zeros((count, *values.shape[1:]), values.dtype)])


def _eval_step(program: TrainProgram, *, num_sources: int):
    """Jitted ``(params, batch) -> {"nats", "tokens"}`` per source, weighted as in training."""
    losses_fn = token_losses()

    def step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        losses, mask = losses_fn(program.model, params, batch)
        source = jax.nn.one_hot(batch["source_id"], num_sources, dtype=jnp.float32)
        return {"nats": source.T @ losses.sum(axis=1), "tokens": source.T @ mask.sum(axis=1)}

    replicated = NamedSharding(program.mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(program.shardings.params, None), out_shardings=replicated)


def _scalars(
    names: list[str], *, nats: np.ndarray, tokens: np.ndarray, num_bytes: np.ndarray
) -> dict[str, float]:
    """Per source and over all: nats per scored token, and bits per byte of their text."""
    groups = [(f"val/{name}/", i) for i, name in enumerate(names)] + [("val/", slice(None))]
    scalars = {}
    for prefix, index in groups:
        n, t, b = (np.sum(values[index]) for values in (nats, tokens, num_bytes))
        if t and b:  # a source without a scored token has no figures
            scalars[f"{prefix}loss"] = float(n / t)
            scalars[f"{prefix}bpb"] = float(n / math.log(2) / b)
    return scalars


def _brief(scalars: dict[str, float]) -> str:
    """``code loss 2.1034 bpb 0.8120 | ... | all loss ... bpb ...`` for the log."""
    prefixes = [key.removesuffix("loss") for key in scalars if key.endswith("/loss")]
    return " | ".join(
        f"{prefix.removeprefix('val/').rstrip('/') or 'all'} loss {scalars[prefix + 'loss']:.4f} "
        f"bpb {scalars[prefix + 'bpb']:.4f}"
        for prefix in prefixes
    )
