"""Where each source's data lives: a gin-configurable ``Source`` per data set, and its Task.

A study's mixture names sources ("code_python", "text", ...) that each belong to one of paper A's
categories; storage (TFRecord or ArrayRecord globs, local or gs://, or a TFDS data set) is a gin
parameter, so the same mixture runs on the local demo corpus or on a bucket. A source holds
documents (pre-training) or (prompt, response) instruction examples (instruction tuning).
"""

import dataclasses
import functools
import hashlib
import re
from collections.abc import Iterator, Mapping

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from codemix_jax.data.corpus import SHARD_GLOB, SOURCES
from codemix_jax.data.instruction_sets import INSTRUCTION_GLOB, INSTRUCTION_SETS
from codemix_jax.data.instructions import PROMPT, PROMPT_IDS, RESPONSE, RESPONSE_IDS
from codemix_jax.data.tasks import instruction_task, packed_task

CATEGORIES = ("text", "code", "markup", "code_adjacent", "synthetic_code", "high_quality")
FORMATS = ("tfrecord", "arrayrecord", "tfds")
KINDS = ("document", "instruction")

# What writes each format's files, for the error raised when they are missing.
_MAKE_FILES = {
    "tfrecord": "`codemix ingest --input RAW_GLOB --out_dir DIR` "
    "(the local demo corpus: `codemix build-corpus --out_dir DIR`)",
    "arrayrecord": "an ArrayRecord writer of serialized tf.train.Example records",
    "tfds": "`tfds build NAME --data_dir DIR`",
}
_MAKE_INSTRUCTIONS = (
    "`codemix ingest --instruction --input JSONL_GLOB --out_dir DIR` "
    "(the local instruction sets: `codemix build-instructions --out_dir DIR`)"
)
_ARRAY_RECORD_CHUNK = 1024  # records per read call: few Python calls, bounded memory

Feature = tf.io.FixedLenFeature | tf.io.RaggedFeature


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Source:
    """One named data set, read as full packed rows by its seqio Task.

    Attributes:
      name: unique key in shares and metrics (letters, digits, underscores).
      category: one of ``CATEGORIES``.
      train: file glob (tfrecord, arrayrecord; local or gs://) or TFDS "name:version".
      validation: held-out split in the same form; for TFDS a split name such as "validation".
      format: one of ``FORMATS``.
      text_feature: the documents' bytes feature.
      pretokenized: read int64 "targets" ids (written by `codemix ingest --vocab_path`, no EOS)
        instead of tokenizing ``text_feature``; the ids must come from the run's vocabulary.
      tfds_data_dir: where the TFDS data set is prepared (TFDS's default when None).
      kind: "document" (pre-training: every token is trained on) or "instruction": records of
        "prompt" and "response" texts (or, pretokenized, "prompt_ids" and "response_ids"), as
        `codemix ingest --instruction` writes them; the loss is on response tokens and EOS only.
        ``text_feature`` is not read then, and TFDS is not a format for them.
    """

    name: str
    category: str
    train: str
    validation: str | None = None
    format: str = "tfrecord"
    text_feature: str = "text"
    pretokenized: bool = False
    tfds_data_dir: str | None = None
    kind: str = "document"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\w+", self.name):
            raise ValueError(f"source name must be letters, digits, underscores; got {self.name!r}")
        if self.category not in CATEGORIES:
            raise ValueError(
                f"source {self.name!r}: unknown category {self.category!r}; known: {CATEGORIES}"
            )
        if self.format not in FORMATS:
            raise ValueError(
                f"source {self.name!r}: unknown format {self.format!r}; known: {FORMATS}"
            )
        if self.format == "tfds" and not re.fullmatch(r"[^:]+:\d+\.\d+\.\d+", self.train):
            raise ValueError(
                f"source {self.name!r}: a TFDS source needs train='name:version' "
                f"(e.g. 'c4/en:3.1.0'), got {self.train!r}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: unknown kind {self.kind!r}; known: {KINDS}")
        if self.kind == "instruction" and self.format == "tfds":
            raise ValueError(
                f"source {self.name!r}: instruction sources read TFRecord or ArrayRecord shards; "
                "turn the set's JSONL into shards with `codemix ingest --instruction`"
            )
        if self.tfds_data_dir is not None and self.format != "tfds":
            raise ValueError(
                f"source {self.name!r}: tfds_data_dir is only read by format 'tfds', "
                f"not {self.format!r}"
            )

    def task(self, *, vocab_path: str) -> seqio.Task:
        """The Task yielding full packed rows of this source, registered once per configuration."""
        digest = hashlib.sha256(repr((self, vocab_path)).encode()).hexdigest()[:12]
        name = f"codemix_{self.name}_{digest}"
        if self.kind == "instruction":
            return instruction_task(
                name,
                data_source=self._data_source(),
                vocab_path=vocab_path,
                pretokenized=self.pretokenized,
            )
        return packed_task(
            name,
            data_source=self._data_source(),
            vocab_path=vocab_path,
            feature="targets" if self.pretokenized else self.text_feature,
            pretokenized=self.pretokenized,
        )

    def require_files(self, split: str) -> None:
        """Fails early and clearly where seqio would fail deep inside tf.data."""
        location = self._locations().get(split)
        if location is None:
            raise ValueError(
                f"source {self.name!r} has no {split!r} split; set Source.{split} for it"
            )
        if self.format == "tfds":
            self._require_tfds_split(location)
        elif not tf.io.gfile.glob(location):
            make = _MAKE_INSTRUCTIONS if self.kind == "instruction" else _MAKE_FILES[self.format]
            raise FileNotFoundError(
                f"source {self.name!r}: no {self.format} files match {location!r}; "
                f"write them with {make}."
            )
        elif self.format == "tfrecord":
            self._require_features(sorted(tf.io.gfile.glob(location))[0])

    def _require_features(self, path: str) -> None:
        """The first record of ``path`` must hold every feature this source parses: a missing
        int64 feature parses as no tokens, so pretokenized settings over text shards (or
        the reverse) would train silently on empty rows. A corrupt record is left to the reader,
        which names the damaged file."""
        try:
            records = [record.numpy() for record in tf.data.TFRecordDataset(path).take(1)]
        except tf.errors.DataLossError:
            return
        for record in records:
            present = set(tf.train.Example.FromString(record).features.feature)
            if missing := sorted(set(self._features()) - present):
                raise ValueError(
                    f"source {self.name!r}: the records of {path} have no {missing} (they hold "
                    f"{sorted(present)}), which Source.kind={self.kind!r}, "
                    f"pretokenized={self.pretokenized} reads"
                )

    def tfrecord_files(self, split: str) -> list[str]:
        """The TFRecord files of ``split`` (none for other formats), for locating corrupt data."""
        if self.format != "tfrecord" or split not in self._locations():
            return []
        return sorted(tf.io.gfile.glob(self._locations()[split]))

    def _locations(self) -> dict[str, str]:
        """Split -> file glob, or -> TFDS split name for a TFDS source."""
        train = "train" if self.format == "tfds" else self.train
        splits = {"train": train, "validation": self.validation}
        return {split: location for split, location in splits.items() if location is not None}

    def _data_source(self) -> seqio.DataSource:
        if self.format == "tfds":
            return seqio.TfdsDataSource(
                tfds_name=self.train, tfds_data_dir=self.tfds_data_dir, splits=self._locations()
            )
        features = self._features()
        if self.format == "tfrecord":
            return seqio.TFExampleDataSource(self._locations(), feature_description=features)
        return seqio.FileDataSource(
            read_file_fn=functools.partial(_read_array_record, features=features),
            split_to_filepattern=self._locations(),
        )

    def _features(self) -> dict[str, Feature]:
        """What is parsed from each tf.train.Example record."""
        if self.kind == "instruction":
            names = (PROMPT_IDS, RESPONSE_IDS) if self.pretokenized else (PROMPT, RESPONSE)
        else:
            names = ("targets",) if self.pretokenized else (self.text_feature,)
        if self.pretokenized:
            return {name: tf.io.RaggedFeature(tf.int64) for name in names}
        return {name: tf.io.FixedLenFeature([], tf.string) for name in names}

    def _require_tfds_split(self, split: str) -> None:
        hint = f"prepare it with {_MAKE_FILES['tfds']}"
        try:
            builder = tfds.builder(self.train, data_dir=self.tfds_data_dir)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise FileNotFoundError(
                f"source {self.name!r}: TFDS data set {self.train!r} not found in "
                f"{self.tfds_data_dir or 'the default TFDS data dir'}; {hint}."
            ) from error
        prepared = list(builder.info.splits)
        if split.split("[")[0] not in prepared:
            raise FileNotFoundError(
                f"source {self.name!r}: TFDS data set {self.train!r} in {builder.data_dir} has "
                f"no split {split!r} (prepared: {prepared}); {hint}."
            )


def _read_array_record(path: tf.Tensor, *, features: Mapping[str, Feature]) -> tf.data.Dataset:
    """The parsed tf.train.Example records of one ArrayRecord file (seqio has no such reader)."""
    records = tf.data.Dataset.from_generator(
        _array_records, args=(path,), output_signature=tf.TensorSpec([], tf.string)
    )
    return records.map(lambda record: tf.io.parse_single_example(record, features))


def _array_records(path: bytes) -> Iterator[bytes]:
    reader = ArrayRecordReader(path.decode())
    try:
        count = reader.num_records()
        for start in range(0, count, _ARRAY_RECORD_CHUNK):
            yield from reader.read(start, min(start + _ARRAY_RECORD_CHUNK, count))
    finally:
        reader.close()


@gin.configurable
def local_sources(*, corpus_dir: str = "data/local/corpus") -> list[Source]:
    """The demo corpus (`codemix build-corpus`): code, text and markup, each its own category."""
    return [
        Source(
            name=source,
            category=source,
            train=SHARD_GLOB.format(corpus_dir=corpus_dir, source=source, split="train"),
            validation=SHARD_GLOB.format(corpus_dir=corpus_dir, source=source, split="validation"),
        )
        for source in SOURCES
    ]


@gin.configurable
def local_instruction_sources(*, instructions_dir: str = "data/local/instructions") -> list[Source]:
    """The local instruction sets (`codemix build-instructions`): 'text' and 'code' examples,
    named as paper B's text:code schedules (gin/data/mixture_schedules/) name their sources."""

    def glob(name: str, split: str) -> str:
        return INSTRUCTION_GLOB.format(instructions_dir=instructions_dir, name=name, split=split)

    return [
        Source(
            name=name,
            category=name,
            kind="instruction",
            train=glob(name, "train"),
            validation=glob(name, "validation"),
        )
        for name in INSTRUCTION_SETS
    ]
