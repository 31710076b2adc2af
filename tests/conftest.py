"""Shared fixtures: a small real corpus and vocabulary, built once per test session; one JAX
compilation cache for the whole run."""

import os
import shutil
import tempfile
from typing import NamedTuple

import jax
import pytest

from codemix_jax.data import build_local_corpus, train_vocab
from codemix_jax.data.instruction_sets import build_local_instructions

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = pytest.StashKey[str]()  # the cache dir this process made (and removes at the end)


def pytest_configure(config: pytest.Config) -> None:
    """Most tests compile the same tiny train steps again, in this process and in the `codemix`
    processes they start: JAX's persistent compilation cache, fresh for each run and shared by
    the xdist workers (they inherit the controller's environment) and every subprocess, compiles
    each once. It changes how long a compile takes, never what runs."""
    if _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="codemix-test-jax-cache-")
        config.stash[_OWN_CACHE] = os.environ[_CACHE_ENV]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config: pytest.Config) -> None:
    if own := config.stash.get(_OWN_CACHE, None):
        shutil.rmtree(own, ignore_errors=True)


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


@pytest.fixture(scope="session")
def trained_run(local_data, tmp_path_factory) -> str:
    """A real run of the tiny smoke model, 8 steps with checkpoints at 4 and 8 (both kept): what
    sampling, evaluation and export read. Initialised with large weights, so that after 8 steps
    its next token still depends strongly on the context (a test comparing greedy decodes then
    fails when a position or a cached key is wrong, as it would not with near-uniform logits)."""
    from codemix_jax import cli

    run_dir = str(tmp_path_factory.mktemp("trained_run"))
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 8",
        "ModelConfig.initializer_std = 0.3",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 8",
        "train.checkpoint_every = 4",
        "train.keep_checkpoints = 5",
        "train.log_every = 4",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    args = ["train", "--gin_file", "gin/experiments/smoke.gin", "--run_dir", run_dir, *flags]
    assert cli.main(args) == 0
    return run_dir


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory) -> str:
    """``trained_run``'s step 8 exported by `codemix export` as a Hugging Face folder."""
    from codemix_jax import cli

    out = str(tmp_path_factory.mktemp("exported_run") / "hf")
    assert cli.main(["export", "--run_dir", trained_run, "--step", "8", "--out", out]) == 0
    return out


# The suite runs on two workers, a test file per worker at a time (pyproject.toml's addopts, with
# xdist's reordering by test count turned off). A worker takes the next file when it is nearly
# done with its own, so the longest files go first (measured on the 2-core host, longest first);
# the rest keep their order. Otherwise a long file with few tests started last leaves the other
# worker idle for minutes.
LONGEST_FILES_FIRST = [
    "test_multihost.py",
    "test_no_hang.py",
    "test_damaged_checkpoints.py",
    "test_init_from.py",
    "test_preemption.py",
    "test_validation.py",
    "test_experiment.py",
    "test_cli.py",
    "test_stops.py",
    "test_sharding.py",
    "test_resume.py",
    "test_sampling.py",
    "test_microbatches.py",
    "test_export.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
