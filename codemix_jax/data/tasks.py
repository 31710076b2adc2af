"""The seqio Task of a source: documents -> token ids + EOS -> full packed rows.

Packing happens inside the Task, after seqio's repeat, so every example is a full row of
``seq_len`` tokens (rows are token-equal) and documents flow across epoch boundaries without a
ragged tail.
"""

import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

from codemix_jax.data.packing import pack_rows
from codemix_jax.data.vocab import load_vocab

_tokenize_and_append_eos = functools.partial(
    seqio.preprocessors.tokenize_and_append_eos, copy_pretokenized=False
)


def packed_task(
    name: str, *, data_source: seqio.DataSource, vocab_path: str, feature: str, pretokenized: bool
) -> seqio.Task:
    """The Task named ``name``, registered on first use: callers make names unique per config.

    ``feature`` holds a document's text, or its int64 token ids (no EOS) when ``pretokenized``.
    """
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    to_ids = seqio.preprocessors.append_eos if pretokenized else _tokenize_and_append_eos
    return seqio.TaskRegistry.add(
        name,
        source=data_source,
        output_features={"targets": seqio.Feature(load_vocab(vocab_path), add_eos=True)},
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": feature}),
            to_ids,
            _pack,
        ],
    )


def _pack(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    if not sequence_length or "targets" not in sequence_length:
        raise ValueError(f"packing needs sequence_length={{'targets': L}}, got {sequence_length}")
    return pack_rows(dataset, seq_len=sequence_length["targets"])
