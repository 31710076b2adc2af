"""Data path: corpora -> SentencePiece vocab -> seqio Task per source -> packed rows -> mixture."""

from codemix_jax.data.corpus import SOURCES, SPLITS, build_local_corpus
from codemix_jax.data.mixture import HostBatches, MixtureInput
from codemix_jax.data.packing import pack_rows
from codemix_jax.data.sources import CATEGORIES, Source, local_sources
from codemix_jax.data.vocab import load_vocab, train_vocab

__all__ = [
    "CATEGORIES",
    "SOURCES",
    "SPLITS",
    "HostBatches",
    "MixtureInput",
    "Source",
    "build_local_corpus",
    "load_vocab",
    "local_sources",
    "pack_rows",
    "train_vocab",
]
