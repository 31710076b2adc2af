"""Mixing sources at TOKEN shares and serving each host its slice of every global batch.

seqio Mixture rates sample examples; because every example here is a full row of ``seq_len``
tokens, sampling rows at the configured shares gives exactly those token shares.
"""

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from codemix_jax.data.corpus import SOURCES
from codemix_jax.data.tasks import require_shards, source_task

ROW_FEATURES = ("inputs", "segment_ids", "positions", "source_id")  # besides "targets"


def token_share_mixture(
    tasks: Mapping[str, seqio.Task], shares: Mapping[str, float]
) -> seqio.Mixture:
    """The Mixture sampling each source's Task at its share, registered once per configuration."""
    rates = [(tasks[source].name, shares[source]) for source in sorted(tasks)]
    name = f"codemix_mix_{hashlib.sha256(repr(rates).encode()).hexdigest()[:12]}"
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    return seqio.MixtureRegistry.add(name, rates)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MixtureInput:
    """Packed rows from the local corpus, mixed at token shares, batched per host.

    Attributes:
      shares: source -> share of TOKENS; sources with share 0 are never read.
      num_threads: tf.data thread pool size (a few on a small host, more on a pod host).
    """

    corpus_dir: str
    vocab_path: str
    shares: Mapping[str, float]
    seq_len: int
    global_batch_size: int
    seed: int = 0
    split: str = "train"
    num_threads: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shares) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown} in shares; known sources: {SOURCES}")
        negative = {s: v for s, v in self.shares.items() if v < 0}
        if negative:
            raise ValueError(f"shares must be >= 0, got {negative}")
        if not math.isclose(sum(self.shares.values()), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ValueError(
                f"shares must sum to 1, got {dict(self.shares)} (sum {sum(self.shares.values())})"
            )
        for field in ("seq_len", "global_batch_size", "num_threads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

    @property
    def source_names(self) -> tuple[str, ...]:
        """Fixed source order; batches' "source_id" indexes it."""
        return SOURCES

    def host_batches(
        self, *, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator over this host's rows of each global batch.

        Each host reads only its own shard of every source, so hosts' rows are disjoint. Missing
        corpus or vocabulary fails here, before the first batch is requested.
        """
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if self.global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"process_count {process_count}"
            )
        dataset = self._mixture().get_dataset(
            sequence_length={"targets": self.seq_len},
            split=self.split,
            shuffle=True,
            seed=self.seed,
            shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count),
            num_epochs=None,
            passthrough_features=ROW_FEATURES,
        )
        dataset = dataset.batch(self.global_batch_size // process_count, drop_remainder=True)
        return dataset.with_options(self._options()).prefetch(2).as_numpy_iterator()

    def _mixture(self) -> seqio.Mixture:
        sampled = [source for source in SOURCES if self.shares.get(source, 0) > 0]
        tasks = {}
        for source in sampled:
            require_shards(corpus_dir=self.corpus_dir, source=source, split=self.split)
            tasks[source] = source_task(
                source=source, corpus_dir=self.corpus_dir, vocab_path=self.vocab_path
            )
        return token_share_mixture(tasks, self.shares)

    def _options(self) -> tf.data.Options:
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = self.num_threads
        options.threading.max_intra_op_parallelism = 1
        return options
