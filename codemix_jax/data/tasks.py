"""The seqio Task of a source: documents or instruction examples -> token ids + EOS -> packed rows.

Packing happens inside the Task, after seqio's repeat, so every example is a full row of
``seq_len`` tokens (rows are token-equal) and documents flow across epoch boundaries without a
ragged tail.
"""

import functools
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from codemix_jax.data.instructions import PROMPT, PROMPT_IDS, RESPONSE, RESPONSE_IDS
from codemix_jax.data.packing import LOSS_WEIGHTS, pack_rows
from codemix_jax.data.vocab import load_vocab

# Documents tokenized at once, per source. Every one in flight is part of the saved input position,
# and seqio's own tokenize keeps 256 in flight: 3.7 MB of the tiny run's 6.9 MB position, which a
# checkpoint snapshots on the training thread. With 16, 200 tiny batches read as fast on 2 cores.
TOKENIZE_PARALLELISM = 16


def packed_task(
    name: str, *, data_source: seqio.DataSource, vocab_path: str, feature: str, pretokenized: bool
) -> seqio.Task:
    """The Task named ``name``, registered on first use: callers make names unique per config.

    ``feature`` holds a document's text, or its int64 token ids (no EOS) when ``pretokenized``.
    """
    to_ids = seqio.preprocessors.append_eos if pretokenized else _tokenize_and_append_eos
    return _task(
        name,
        data_source=data_source,
        vocab_path=vocab_path,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": feature}),
            to_ids,
            _pack,
        ],
    )


def instruction_task(
    name: str, *, data_source: seqio.DataSource, vocab_path: str, pretokenized: bool
) -> seqio.Task:
    """The Task of (prompt, response) examples: rows also carry per-token ``loss_weights``.

    An example is prompt + response + EOS with weight 1 on the response and EOS only; the weights
    are packed with the tokens, so each example's mask stays on its own tokens in any row.
    ``pretokenized`` reads int64 "prompt_ids" and "response_ids" (no EOS), else tokenizes the
    "prompt" and "response" texts, each on its own.
    """
    return _task(
        name,
        data_source=data_source,
        vocab_path=vocab_path,
        preprocessors=[
            functools.partial(_weighted_example, pretokenized=pretokenized),
            functools.partial(_pack, aligned=(LOSS_WEIGHTS,)),
        ],
    )


def _task(
    name: str, *, data_source: seqio.DataSource, vocab_path: str, preprocessors: Sequence
) -> seqio.Task:
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    return seqio.TaskRegistry.add(
        name,
        source=data_source,
        output_features={"targets": seqio.Feature(load_vocab(vocab_path), add_eos=True)},
        preprocessors=preprocessors,
    )


def _tokenize_and_append_eos(
    dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]
) -> tf.data.Dataset:
    vocab = output_features["targets"].vocabulary
    eos = tf.constant([vocab.eos_id], tf.int32)

    def encode(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        ids = tf.cast(vocab.encode_tf(example["targets"]), tf.int32)
        return {**example, "targets": tf.concat([ids, eos], axis=0)}

    return dataset.map(encode, num_parallel_calls=TOKENIZE_PARALLELISM)


def _weighted_example(
    dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature], *, pretokenized: bool
) -> tf.data.Dataset:
    vocab = output_features["targets"].vocabulary

    def ids(example: Mapping[str, tf.Tensor], text: str, pretokenized_ids: str) -> tf.Tensor:
        tokens = example[pretokenized_ids] if pretokenized else vocab.encode_tf(example[text])
        return tf.cast(tokens, tf.int32)

    def join(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        prompt, response = ids(example, PROMPT, PROMPT_IDS), ids(example, RESPONSE, RESPONSE_IDS)
        eos = tf.constant([vocab.eos_id], tf.int32)
        return {
            "targets": tf.concat([prompt, response, eos], axis=0),
            LOSS_WEIGHTS: tf.concat(
                [tf.zeros_like(prompt), tf.ones_like(response), tf.ones_like(eos)], axis=0
            ),
        }

    return dataset.map(join, num_parallel_calls=TOKENIZE_PARALLELISM)


def _pack(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    aligned: Sequence[str] = (),
) -> tf.data.Dataset:
    if not sequence_length or "targets" not in sequence_length:
        raise ValueError(f"packing needs sequence_length={{'targets': L}}, got {sequence_length}")
    return pack_rows(dataset, seq_len=sequence_length["targets"], aligned=aligned)
