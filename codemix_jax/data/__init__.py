"""Data path: local corpus -> SentencePiece vocab -> seqio Tasks -> packed rows -> mixture."""

from codemix_jax.data.corpus import SOURCES, SPLITS, build_local_corpus
from codemix_jax.data.mixture import MixtureInput
from codemix_jax.data.packing import pack_rows
from codemix_jax.data.vocab import load_vocab, train_vocab

__all__ = [
    "SOURCES",
    "SPLITS",
    "MixtureInput",
    "build_local_corpus",
    "load_vocab",
    "pack_rows",
    "train_vocab",
]
