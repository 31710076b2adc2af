"""Packing a stream of tokenized documents into full rows of exactly ``seq_len`` tokens.

Documents are concatenated and cut at every ``seq_len`` tokens, so long documents span rows and no
row is padded: a row's share of the mixture is then exactly its share of tokens.
"""

import tensorflow as tf


def pack_rows(dataset: tf.data.Dataset, *, seq_len: int, key: str = "targets") -> tf.data.Dataset:
    """Rows of "targets", "segment_ids", "positions" and "inputs", each of shape [seq_len].

    ``dataset[key]`` holds 1-D int32 token ids per document (EOS already appended). The tail of a
    finite stream that does not fill a row is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    def cut(carry, example):
        tokens = tf.concat([carry[0], tf.cast(example[key], tf.int32)], axis=0)
        starts = tf.concat([carry[1], tf.one_hot(0, tf.size(example[key]), dtype=tf.int32)], 0)
        end = tf.size(tokens) // seq_len * seq_len
        return (tokens[end:], starts[end:]), _rows(tokens[:end], starts[:end], seq_len)

    empty = tf.zeros([0], tf.int32)
    return dataset.scan((empty, empty), cut).unbatch()


def _rows(tokens: tf.Tensor, starts: tf.Tensor, seq_len: int) -> dict[str, tf.Tensor]:
    """Cuts whole rows from flat tokens and document-start flags, all rows at once.

    Every row start also opens a segment, so a document continued from the previous row is
    a new segment at position 0 with input 0.
    """
    index = tf.range(tf.size(tokens))
    starts = tf.where(index % seq_len == 0, 1, starts)
    segments = tf.cumsum(starts)  # counted over all rows; made per-row below
    segment_start = tf.gather(tf.where(starts > 0)[:, 0], segments - 1)
    positions = index - tf.cast(segment_start, tf.int32)
    inputs = tf.where(positions == 0, 0, tf.concat([[0], tokens[:-1]], axis=0))
    rows = [tf.reshape(x, [-1, seq_len]) for x in (tokens, segments, positions, inputs)]
    targets, segments, positions, inputs = rows
    return {
        "targets": targets,
        "segment_ids": segments - segments[:, :1] + 1,
        "positions": positions,
        "inputs": inputs,
    }
