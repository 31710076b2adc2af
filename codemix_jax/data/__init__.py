"""Data path: corpora -> SentencePiece vocab -> seqio Task per source -> packed rows -> mixture."""

from codemix_jax.data.corpus import SOURCES, SPLITS, build_local_corpus
from codemix_jax.data.mixture import HostBatches, MixtureInput
from codemix_jax.data.packing import pack_rows
from codemix_jax.data.paper_a_local import paper_a_local_sources
from codemix_jax.data.phases import equal_phases
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
    "equal_phases",
    "load_vocab",
    "local_sources",
    "pack_rows",
    "paper_a_local_sources",
    "train_vocab",
]
