"""Mixing sources at exact TOKEN shares that may change at step boundaries; per-host batches.

seqio Mixture rates sample examples at random; the papers' proportions are shares of tokens and the
studies compare runs whose shares differ by a few points. So every source is packed into full rows
of ``seq_len`` tokens (rows are then token-equal), and each global batch gets a deterministic number
of rows per source by cumulative rounding: every batch has exactly ``global_batch_size`` rows and,
over the first ``n`` batches of a phase, a source's row count is within one row of
``share * n * global_batch_size``. The rows' order inside a batch is a seeded shuffle.

The whole pipeline is one tf.data graph whose iterator state (source read positions, shuffle
buffers, the step counter that drives the mixing) can be saved and restored, so a resumed run sees
exactly the batches an uninterrupted run would, without replaying the stream.
"""

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future

import gin
import numpy as np
import seqio
import tensorflow as tf

from codemix_jax.data.packing import LOSS_WEIGHTS
from codemix_jax.data.sources import Source

Shares = Mapping[str, float]
Phase = tuple[int, Shares]  # (first step of the phase, source name -> token share)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MixtureInput:
    """Packed rows of ``sources`` mixed at token shares, split over hosts.

    Attributes:
      sources: every source a run may read; ``source_id`` in batches indexes this order.
      shares: source name -> share of tokens, for the whole run (or use ``phases``). All tokens
        of a source's rows count, prompts included: an instruction source's rows are as
        token-equal as a document source's, while the loss sees only its response tokens.
      phases: ``[(start_step, shares), ...]`` starting at step 0: the mixture changes at those
        steps (e.g. paper B's four-phase dynamic mixing).
      shuffle_buffer_size: packed rows of each source shuffled on each host before mixing (more
        on a pod host with memory to spare; 1 keeps packing order).
      num_threads: tf.data thread pool size (a few on a small host, more on a pod host).
    """

    sources: Sequence[Source]
    vocab_path: str
    seq_len: int
    global_batch_size: int
    shares: Shares | None = None
    phases: Sequence[Phase] | None = None
    seed: int = 0
    split: str = "train"
    shuffle_buffer_size: int = 256
    num_threads: int = 2

    def __post_init__(self) -> None:
        for field in ("seq_len", "global_batch_size", "shuffle_buffer_size", "num_threads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if (self.shares is None) == (self.phases is None):
            raise ValueError("set exactly one of MixtureInput.shares and MixtureInput.phases")
        starts = list(self.phase_starts)
        if starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"phase start steps must begin at 0 and increase, got {starts}")
        for _, shares in self.schedule:
            check_shares(shares, names)

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self.sources)

    @property
    def schedule(self) -> tuple[Phase, ...]:
        """The phases, a single one from step 0 when ``shares`` is set."""
        phases = ((0, self.shares),) if self.shares is not None else self.phases
        return tuple((int(start), dict(shares)) for start, shares in phases)

    @property
    def phase_starts(self) -> tuple[int, ...]:
        return tuple(start for start, _ in self.schedule)

    def phase_at(self, step: int) -> int:
        """Index of the phase that batch ``step`` (0-based) belongs to."""
        return int(np.searchsorted(self.phase_starts, step, side="right")) - 1

    def share_matrix(self) -> np.ndarray:
        """[phases, sources] token shares, sources in ``source_names`` order."""
        return np.array(
            [[shares.get(name, 0.0) for name in self.source_names] for _, shares in self.schedule]
        )

    def cumulative_shares(self) -> np.ndarray:
        """[phases, sources] running totals of the shares, each phase ending at exactly 1.0.

        Shares pass validation when they sum to 1 within 1e-6. Rounding a last running total of
        0.9999999 times a row count would now and then give a batch one row short, and every later
        batch would borrow a row from the next step. So totals are divided by the phase's sum and
        pinned to 1.0 from the last source with a share onwards: rounding ``1.0 * rows`` is exact.
        """
        shares = self.share_matrix()
        cumulative = np.cumsum(shares, axis=1) / shares.sum(axis=1, keepdims=True)
        for phase, row in enumerate(shares):
            cumulative[phase, np.flatnonzero(row)[-1] :] = 1.0
        return cumulative

    def rows_per_source(self, steps: Sequence[int]) -> np.ndarray:
        """[len(steps), sources] rows each source gives to global batches ``steps`` (0-based)."""
        return self._row_counts(tf.constant(steps, tf.int64)).numpy()

    def _row_counts(self, steps: tf.Tensor) -> tf.Tensor:
        """Cumulative rounding: rows from sources 0..k over a phase's first n batches are
        ``round(total_k * n * batch)``; differencing over n and then over k gives the counts."""
        totals = tf.constant(self.cumulative_shares() * self.global_batch_size, tf.float64)
        starts = tf.constant(self.phase_starts, tf.int64)
        phase = tf.searchsorted(starts, steps, side="right") - 1
        done = tf.cast(steps - tf.gather(starts, phase), tf.float64)[:, None]
        totals = tf.gather(totals, phase)
        through_k = _rounded(totals * (done + 1)) - _rounded(totals * done)
        return through_k - tf.pad(through_k[:, :-1], [[0, 0], [1, 0]])

    def stream_settings(self) -> dict:
        """The settings that decide which rows each batch holds, as JSON values.

        A saved input position means something only under the same settings, so a resumed run must
        match them. File locations and the thread count may change; they are not here.
        """
        return {
            "sources": list(self.source_names),
            "split": self.split,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "phases": [
                [start, {name: float(shares.get(name, 0.0)) for name in self.source_names}]
                for start, shares in self.schedule
            ],
            "seed": self.seed,
            "shuffle_buffer_size": self.shuffle_buffer_size,
        }

    def _read_indices(self) -> np.ndarray:
        """Indices of the sources some phase reads; the others' files are never opened."""
        return np.flatnonzero(self.share_matrix().max(axis=0) > 0)

    def host_batches(self, *, process_index: int = 0, process_count: int = 1) -> "HostBatches":
        """This host's rows of every global batch, from step 0, as a checkpointable iterator.

        Each host reads only its own shard of every source, so hosts' rows are disjoint. Missing
        files or vocabulary fail here, before the first batch is requested.
        """
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if self.global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"process_count {process_count}"
            )
        shard = seqio.ShardInfo(index=process_index, num_shards=process_count)
        read = [self.sources[index] for index in self._read_indices()]
        return HostBatches(self._dataset(shard), sources=read, split=self.split)

    def _dataset(self, shard: seqio.ShardInfo) -> tf.data.Dataset:
        used = self._read_indices()
        rows = [self._source_rows(int(index), shard) for index in used]
        # Choices index the used sources; map the global source ids onto that list.
        position = np.full(len(self.sources), -1, np.int64)
        position[used] = np.arange(len(used))
        choices = self._row_sources(shard).map(lambda source: tf.gather(position, source))
        host_rows = self.global_batch_size // shard.num_shards
        dataset = tf.data.Dataset.choose_from_datasets(rows, choices, stop_on_empty_dataset=True)
        dataset = dataset.batch(host_rows, drop_remainder=True)
        return dataset.with_options(self._options()).prefetch(2)

    def _source_rows(self, index: int, shard: seqio.ShardInfo) -> tf.data.Dataset:
        source = self.sources[index]
        source.require_files(self.split)
        dataset = source.task(vocab_path=self.vocab_path).get_dataset(
            sequence_length={"targets": self.seq_len},
            split=self.split,
            shuffle=True,
            shuffle_buffer_size=self.shuffle_buffer_size,
            seed=self.seed,
            shard_info=shard,
            num_epochs=None,
        )
        return dataset.map(
            lambda row: {**_with_loss_weights(row), "source_id": tf.constant(index, tf.int32)}
        )

    def _row_sources(self, shard: seqio.ShardInfo) -> tf.data.Dataset:
        """Global source id of each of this host's rows, step after step."""
        batch, seed = self.global_batch_size, self.seed
        host_rows = batch // shard.num_shards
        first = shard.index * host_rows

        def step_sources(step):
            counts = self._row_counts(step[None])[0]
            # Batches are cut from this stream by row count: a short one would shift all later ones.
            check = tf.debugging.assert_equal(tf.reduce_sum(counts), tf.constant(batch, tf.int64))
            with tf.control_dependencies([check]):
                sources = tf.repeat(tf.range(len(self.sources), dtype=tf.int64), counts)
            shuffle_seed = tf.stack([tf.constant(seed, tf.int64), step])
            sources = tf.random.experimental.stateless_shuffle(sources, seed=shuffle_seed)
            return sources[first : first + host_rows]

        return tf.data.Dataset.range(2**62).map(step_sources).unbatch()

    def _options(self) -> tf.data.Options:
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = self.num_threads
        options.threading.max_intra_op_parallelism = 1
        return options


def _with_loss_weights(row: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Every row carries ``loss_weights``: a document's rows (pre-training) weigh every token."""
    return {LOSS_WEIGHTS: tf.ones_like(row["targets"]), **row}


def _rounded(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(x), tf.int64)


def check_shares(shares: Shares, names: Sequence[str]) -> None:
    """ValueError naming the problem: unknown source, negative share, or a sum other than 1."""
    unknown = sorted(set(shares) - set(names))
    if unknown:
        raise ValueError(f"unknown source(s) {unknown} in shares; known sources: {list(names)}")
    negative = {name: value for name, value in shares.items() if value < 0}
    if negative:
        raise ValueError(f"shares must be >= 0, got {negative}")
    total = sum(shares.values())
    if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"shares must sum to 1, got {dict(shares)} (sum {total})")


class HostBatches(Iterator[dict[str, np.ndarray]]):
    """Iterator over host batches (numpy int32 dicts) whose position can be saved and restored.

    The position holds the sources' read positions and buffers (documents being tokenized and
    packed, shuffled rows), not the data read so far, so it costs the same at any step.
    """

    def __init__(self, dataset: tf.data.Dataset, *, sources: Sequence[Source], split: str):
        self._iterator = iter(dataset)
        self._sources, self._split = sources, split
        self._taking: Future[tf.Tensor] | None = None  # a position being taken on another thread

    def __next__(self) -> dict[str, np.ndarray]:
        if self._taking is not None:
            self._taking.result()  # it must see this batch not yet drawn
            self._taking = None
        try:
            batch = next(self._iterator)
        except tf.errors.DataLossError as error:
            # tf.data names the record but not the file: find the file before giving up.
            files = [path for s in self._sources for path in s.tfrecord_files(self._split)]
            raise CorruptDataError(_describe_corruption(files, error)) from error
        return {name: value.numpy() for name, value in batch.items()}

    def position(self) -> tf.Tensor:
        """A snapshot of the position (a variant tensor) that reading on does not change.

        Taking it copies the buffers (milliseconds); turning it into bytes and writing it, the
        slower part, can then happen in the background (``write_position``).
        """
        return self._iterator._serialize_to_tensors()[_ITERATOR_STATE]  # tf.train.Checkpoint's hook

    def position_on(self, executor: Executor) -> Future[tf.Tensor]:
        """``position()``, taken on ``executor``'s thread; the next batch waits for it.

        A checkpoint's snapshot thus runs beside the step on the devices, not after it.
        """
        self._taking = executor.submit(self.position)
        return self._taking

    def save(self, path: str) -> None:
        """Write the current position to ``path`` (any filesystem TF knows, gs:// included)."""
        write_position(self.position(), path)

    def restore(self, path: str) -> None:
        """Rewind or advance to the position ``save`` or ``write_position`` wrote to ``path``."""
        self._iterator._restore_from_tensors({_ITERATOR_STATE: read_position(path)})


_ITERATOR_STATE = "_STATE"  # the key of a tf.data iterator's state among its checkpoint tensors


def write_position(position: tf.Tensor, path: str) -> None:
    """Write a ``HostBatches.position`` snapshot to ``path``."""
    tf.io.write_file(path, tf.io.serialize_tensor(position))


def read_position(path: str) -> tf.Tensor:
    """The snapshot ``write_position`` wrote to ``path``; tf.errors.OpError if unreadable."""
    return tf.io.parse_tensor(tf.io.read_file(path), out_type=tf.variant)


class CorruptDataError(ValueError):
    """An input file that cannot be read, named when it can be found."""


MAX_CORRUPTION_SCAN_BYTES = 50 * 2**30


def _describe_corruption(files: Sequence[str], error: tf.errors.DataLossError) -> str:
    """Scan the run's TFRecord files (up to a byte budget) for the one that fails to read."""
    scanned = 0
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except tf.errors.DataLossError:
            return f"corrupt input file {path}: {error.message}"
        scanned += tf.io.gfile.stat(path).length
        if scanned > MAX_CORRUPTION_SCAN_BYTES:
            break
    return (
        f"corrupt input data ({error.message}); no corrupt file found among the first "
        f"{scanned / 2**30:.1f} GiB of {len(files)} TFRecord files read by this run"
    )
