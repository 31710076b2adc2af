"""Packing a stream of tokenized documents into full rows of exactly ``seq_len`` tokens.

Documents are concatenated and cut at every ``seq_len`` tokens, so long documents span rows and no
row is padded: a row's share of the mixture is then exactly its share of tokens.
"""

from collections.abc import Sequence

import tensorflow as tf

LOSS_WEIGHTS = "loss_weights"  # per-token weight of the loss; rows without it weigh every token


def pack_rows(
    dataset: tf.data.Dataset, *, seq_len: int, key: str = "targets", aligned: Sequence[str] = ()
) -> tf.data.Dataset:
    """Rows of "targets", "segment_ids", "positions" and "inputs", each of shape [seq_len].

    ``dataset[key]`` holds 1-D int32 token ids per document (EOS already appended). Each feature
    named in ``aligned`` holds one int32 value per token of ``key`` (e.g. "loss_weights"); it is
    cut at the same places, so its values stay on their tokens. The tail of a finite stream that
    does not fill a row is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    def cut(carry, example):
        ids = tf.cast(example[key], tf.int32)
        starts = tf.one_hot(0, tf.size(ids), dtype=tf.int32)
        flat = [tf.concat([carry[0], ids], 0), tf.concat([carry[1], starts], 0)]
        for name, kept in zip(aligned, carry[2:], strict=True):
            values = tf.cast(example[name], tf.int32)
            tf.debugging.assert_equal(tf.size(values), tf.size(ids), f"{name} per {key} id")
            flat.append(tf.concat([kept, values], 0))
        end = tf.size(flat[0]) // seq_len * seq_len
        rows = _rows(flat[0][:end], flat[1][:end], seq_len)
        for name, values in zip(aligned, flat[2:], strict=True):
            rows[name] = tf.reshape(values[:end], [-1, seq_len])
        return tuple(x[end:] for x in flat), rows

    empty = tf.zeros([0], tf.int32)
    return dataset.scan((empty,) * (2 + len(aligned)), cut).unbatch()


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
