"""Shared fixtures: a small real corpus and vocabulary, built once per test session."""

from typing import NamedTuple

import pytest

from codemix_jax.data import build_local_corpus, train_vocab
from codemix_jax.data.instruction_sets import build_local_instructions


class LocalData(NamedTuple):
    corpus_dir: str
    vocab_path: str


@pytest.fixture(scope="session")
def local_data(tmp_path_factory) -> LocalData:
    """About 1 MB per source (several shards each) and a 2048-piece vocab: seconds to build."""
    root = tmp_path_factory.mktemp("local_data")
    corpus_dir = str(root / "corpus")
    build_local_corpus(out_dir=corpus_dir, max_bytes_per_source=1_000_000, docs_per_shard=16)
    vocab_path = train_vocab(
        corpus_dir=corpus_dir, out_path=str(root / "spm.model"), max_bytes=3_000_000
    )
    return LocalData(corpus_dir=corpus_dir, vocab_path=vocab_path)


@pytest.fixture(scope="session")
def local_instructions(tmp_path_factory) -> str:
    """The local text and code instruction sets, 150 examples each; returns their directory."""
    out_dir = str(tmp_path_factory.mktemp("local_instructions"))
    build_local_instructions(out_dir=out_dir, max_examples_per_set=150)
    return out_dir
