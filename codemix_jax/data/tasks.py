"""One seqio Task per source: TFRecord shards -> tokens + EOS -> full packed rows tagged by source.

Packing happens inside the Task, after seqio's repeat, so a Mixture over these Tasks samples whole
rows (equal token counts) and documents flow across epoch boundaries without a ragged tail.
"""

import functools
import hashlib
from collections.abc import Mapping

import gin
import seqio
import tensorflow as tf

from codemix_jax.data.corpus import SHARD_GLOB, SOURCES, SPLITS, TEXT_FEATURE, find_shards
from codemix_jax.data.packing import pack_rows
from codemix_jax.data.vocab import load_vocab


@gin.configurable
def shard_pattern(*, corpus_dir: str, source: str, split: str, template: str = SHARD_GLOB) -> str:
    """The file pattern of one source's split; bind ``template`` to read another layout."""
    return template.format(corpus_dir=corpus_dir, source=source, split=split)


def require_shards(*, corpus_dir: str, source: str, split: str) -> None:
    """Fails early and clearly where seqio would fail deep inside tf.data."""
    find_shards(shard_pattern(corpus_dir=corpus_dir, source=source, split=split))


@gin.configurable
def source_task(
    *, source: str, corpus_dir: str, vocab_path: str, shuffle_buffer_size: int = 256
) -> seqio.Task:
    """The Task reading ``source`` from ``corpus_dir``, registered once per configuration."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known sources: {SOURCES}")
    patterns = {
        split: shard_pattern(corpus_dir=corpus_dir, source=source, split=split) for split in SPLITS
    }
    key = repr((patterns, vocab_path, shuffle_buffer_size)).encode()
    name = f"codemix_{source}_{hashlib.sha256(key).hexdigest()[:12]}"
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    features = {TEXT_FEATURE: tf.io.FixedLenFeature([], tf.string)}
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TFExampleDataSource(patterns, feature_description=features),
        output_features={"targets": seqio.Feature(load_vocab(vocab_path), add_eos=True)},
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": TEXT_FEATURE}),
            functools.partial(seqio.preprocessors.tokenize_and_append_eos, copy_pretokenized=False),
            _pack,
            functools.partial(_tag_source, source_id=SOURCES.index(source)),
        ],
        shuffle_buffer_size=shuffle_buffer_size,
    )


def _pack(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    if not sequence_length or "targets" not in sequence_length:
        raise ValueError(f"packing needs sequence_length={{'targets': L}}, got {sequence_length}")
    return pack_rows(dataset, seq_len=sequence_length["targets"])


def _tag_source(dataset: tf.data.Dataset, source_id: int) -> tf.data.Dataset:
    """Adds "source_id" (an index into SOURCES) so losses can be reported per source."""
    return dataset.map(lambda row: {**row, "source_id": tf.constant(source_id, tf.int32)})
