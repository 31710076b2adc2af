"""A SentencePiece vocabulary trained locally on the corpus, with settings that keep code intact."""

import io
import itertools
import os
from collections.abc import Iterable, Iterator

import sentencepiece as spm
import seqio
import tensorflow as tf

from codemix_jax.data.corpus import SOURCES, read_documents

# seqio's conventions: pad=0, eos=1, unk=2, no BOS. Identity normalisation and kept whitespace
# preserve indentation; byte fallback makes every string encodable and decode(encode(x)) == x.
_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "pad_id": 0,
    "eos_id": 1,
    "unk_id": 2,
    "bos_id": -1,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "byte_fallback": True,
    "num_threads": 2,
    "minloglevel": 1,
}


def train_vocab(
    *, corpus_dir: str, out_path: str, vocab_size: int = 2048, max_bytes: int = 8_000_000
) -> str:
    """Trains on the corpus's train split and writes the ``.model`` file to ``out_path``.

    Each source gets an equal share of ``max_bytes``, so the small prose and markup sources
    are not drowned out by code when the pieces are chosen.
    """
    budget = max_bytes // len(SOURCES)
    sources = [read_documents(corpus_dir=corpus_dir, source=s, split="train") for s in SOURCES]
    lines = itertools.chain.from_iterable(_lines(docs, budget) for docs in sources)
    model = io.BytesIO()
    print(f"[train-vocab] training {vocab_size} pieces on {corpus_dir}", flush=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, **_TRAINER_SETTINGS
    )
    tf.io.gfile.makedirs(os.path.dirname(out_path) or ".")
    with tf.io.gfile.GFile(out_path, "wb") as f:
        f.write(model.getvalue())
    print(f"[train-vocab] wrote {out_path}", flush=True)
    return out_path


def load_vocab(path: str) -> seqio.SentencePieceVocabulary:
    """The vocabulary at ``path``; fails with the fix when it was never trained."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model {path!r} not found; run `codemix train-vocab` first."
        )
    return seqio.SentencePieceVocabulary(path)


def _lines(docs: Iterable[str], budget: int) -> Iterator[str]:
    """Non-blank lines of ``docs`` until ``budget`` bytes; SentencePiece trains on lines."""
    used = 0
    for doc in docs:
        if used >= budget:
            return
        used += len(doc.encode())
        yield from (line for line in doc.splitlines() if line.strip())
