"""``codemix ingest``: raw corpus dumps -> the TFRecord shards our seqio Tasks read.

Each input file becomes ``{split}-{stem}-{k:05d}.tfrecord`` shards of tf.train.Example with a bytes
"text" feature (plus requested metadata) and, given a vocabulary, the int64 "targets" ids of the
text without EOS (the Task appends it), so training never tokenizes. One worker process per file.

Instruction sets (``instruction``) become "prompt" and "response" features instead (and, given a
vocabulary, "prompt_ids" and "response_ids"), so the loss mask survives into the shards. Every
record is checked before ``out_dir`` is touched: a bad one stops the ingest, naming the file, the
line and the field.

An input file is the unit of resumption: its shards are written under ``.tmp/<stem>/``, moved into
place only when the whole file is done, and then ``.done/<stem>.json`` records its counts. A rerun
skips the files with a marker and redoes the others from scratch, so a reader's glob never sees a
partial file.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import seqio
import tensorflow as tf
import tqdm

from codemix_jax.data.corpus import SPLITS, TEXT_FEATURE
from codemix_jax.data.ingest_readers import (
    INVALID_UTF8,
    IngestError,
    Record,
    input_stem,
    read_records,
)
from codemix_jax.data.instructions import (
    PROMPT,
    PROMPT_IDS,
    RESPONSE,
    RESPONSE_IDS,
    InstructionFields,
)
from codemix_jax.data.vocab import load_vocab

log = logging.getLogger(__name__)

TARGETS_FEATURE = "targets"
# Each text feature and the feature that holds its token ids.
_IDS_FEATURE = {TEXT_FEATURE: TARGETS_FEATURE, PROMPT: PROMPT_IDS, RESPONSE: RESPONSE_IDS}
MANIFEST_NAME = "ingest_manifest.json"
_DONE_DIR = ".done"
_TMP_DIR = ".tmp"
_SHARD_NAME = "{split}-{stem}-{index:05d}.tfrecord"
_SKIPS_LOGGED = 5  # first skipped lines/rows remembered per reason


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything that decides the content of the shards; a rerun must use the same."""

    text_field: str
    meta_fields: tuple[str, ...]
    vocab_path: str | None
    validation_fraction: float
    docs_per_shard: int
    max_doc_chars: int
    instruction: InstructionFields | None = None

    def __post_init__(self):
        if not self.text_field:
            raise ValueError("text_field must be a non-empty field name")
        outputs = sorted({*_IDS_FEATURE, *_IDS_FEATURE.values()})
        clash = set(outputs).intersection(self.meta_fields)
        if clash or len(set(self.meta_fields)) != len(self.meta_fields):
            raise ValueError(
                f"meta_fields must be distinct and not named like an output feature {outputs}, "
                f"got {list(self.meta_fields)}"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.docs_per_shard < 1:
            raise ValueError(f"docs_per_shard must be >= 1, got {self.docs_per_shard}")
        if self.max_doc_chars < 0:
            raise ValueError(f"max_doc_chars must be >= 0 (0 = no limit), got {self.max_doc_chars}")

    @property
    def columns(self) -> tuple[str, ...]:
        """The fields read from every record."""
        content = self.instruction.columns if self.instruction else (self.text_field,)
        return (*content, *self.meta_fields)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class _Job(NamedTuple):
    stem: str
    path: str
    out_dir: str
    settings: _Settings


class _Skip(NamedTuple):
    """Why a document record is not written; counted per reason."""

    reason: str


class _Converted(NamedTuple):
    """A record as written: its features, its text's bytes and its token count."""

    features: dict[str, tf.train.Feature]
    text_bytes: int
    tokens: int


def ingest(
    *,
    inputs: Sequence[str],
    out_dir: str,
    text_field: str = "text",
    meta_fields: Sequence[str] = (),
    vocab_path: str | None = None,
    validation_fraction: float = 0.001,
    docs_per_shard: int = 10_000,
    workers: int | None = None,
    max_doc_chars: int = 1_000_000,
    instruction: InstructionFields | None = None,
) -> dict:
    """Ingests the files matching the ``inputs`` globs into ``out_dir``; returns the manifest.

    ``instruction`` reads (prompt, response) records with those fields instead of documents from
    ``text_field``; ``max_doc_chars`` then does not apply.
    """
    settings = _Settings(
        text_field=text_field,
        meta_fields=tuple(meta_fields),
        vocab_path=vocab_path,
        validation_fraction=validation_fraction,
        docs_per_shard=docs_per_shard,
        max_doc_chars=max_doc_chars,
        instruction=instruction,
    )
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    files = _resolve_inputs(inputs)
    if vocab_path is not None:
        load_vocab(vocab_path)  # a missing vocabulary fails now, not in every worker
    if instruction is not None:
        _check_instructions(files, instruction)
    tf.io.gfile.makedirs(f"{out_dir}/{_DONE_DIR}")
    started = time.monotonic()
    results = _finished(files, out_dir, settings)
    jobs = [
        _Job(stem, path, out_dir, settings) for stem, path in files.items() if stem not in results
    ]
    results.update(_run(jobs, workers or min(os.cpu_count() or 1, max(len(jobs), 1))))
    manifest = {
        **settings.to_json(),
        "inputs": {stem: results[stem] for stem in sorted(results)},
        "totals": _totals(results.values()),
    }
    with tf.io.gfile.GFile(f"{out_dir}/{MANIFEST_NAME}", "w") as f:
        json.dump(manifest, f, indent=2)
    _log_summary(manifest["totals"], len(files) - len(jobs), time.monotonic() - started)
    log.info("wrote %s/%s", out_dir, MANIFEST_NAME)
    return manifest


def _resolve_inputs(patterns: Sequence[str]) -> dict[str, str]:
    """Input stem -> file, over all globs; stems name the shards, so they must be unique."""
    if not patterns:
        raise ValueError("no inputs given")
    files: dict[str, str] = {}
    for pattern in patterns:
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"input glob {pattern!r} matches no file")
        for path in matches:
            stem = input_stem(path)
            if files.setdefault(stem, path) != path:
                raise IngestError(
                    f"inputs {files[stem]} and {path} share the stem {stem!r}, "
                    "so their shards would collide; rename one"
                )
    return dict(sorted(files.items()))


def _check_instructions(files: Mapping[str, str], fields: InstructionFields) -> None:
    """Reads every record once, so that a bad one fails before anything is written."""
    for path in files.values():
        for record in read_records(path, columns=fields.columns):
            fields.pair(record, path)


def _finished(files: Mapping[str, str], out_dir: str, settings: _Settings) -> dict:
    """The counts of inputs a previous run finished with the same settings (said so in the log)."""
    results = {}
    for stem, path in files.items():
        marker = f"{out_dir}/{_DONE_DIR}/{stem}.json"
        if not tf.io.gfile.exists(marker):
            continue
        with tf.io.gfile.GFile(marker) as f:
            done = json.load(f)
        if done["settings"] != settings.to_json():
            raise IngestError(
                f"{path} was ingested into {out_dir} with settings {done['settings']}, not "
                f"{settings.to_json()}; use a fresh out_dir or delete {marker} and its shards"
            )
        log.info("skipping %s: already ingested (%s)", path, marker)
        results[stem] = done["counts"]
    return results


def _run(jobs: Sequence[_Job], workers: int) -> dict:
    """Ingests the files, one per worker, with a progress bar over files."""
    results, docs, size = {}, 0, 0
    started = time.monotonic()
    with _mapper(workers) as imap, tqdm.tqdm(total=len(jobs), unit="file", desc="ingest") as bar:
        for stem, counts in imap(_ingest_file, jobs):
            results[stem] = counts
            _log_skips(counts)
            docs += sum(counts["splits"][split]["docs"] for split in SPLITS)
            size += sum(counts["splits"][split]["bytes"] for split in SPLITS)
            seconds = max(time.monotonic() - started, 1e-9)
            bar.set_postfix(docs_s=f"{docs / seconds:.0f}", MB_s=f"{size / seconds / 1e6:.2f}")
            bar.update()
    return results


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """``map`` in this process for one worker, else a pool of fresh processes.

    Spawned, not forked: forking a process that has started TensorFlow's threads can deadlock.
    """
    if workers == 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool.imap_unordered


def _totals(results: Iterable[Mapping]) -> dict:
    """Sums over inputs: per split docs/shards/bytes/tokens, and skips per reason."""
    splits = {split: Counter() for split in SPLITS}
    skipped, files = Counter(), 0
    for counts in results:
        files += 1
        skipped.update(counts["skipped"])
        for split in SPLITS:
            splits[split].update(counts["splits"][split])
    return {
        "files": files,
        "splits": {split: dict(total) for split, total in splits.items()},
        "skipped": dict(sorted(skipped.items())),
    }


def _log_summary(totals: Mapping, n_already_done: int, seconds: float) -> None:
    train, validation = totals["splits"]["train"], totals["splits"]["validation"]
    log.info(
        "ingested %d files (%d done before) in %.1f s: train %d docs (%.1f MB, %d tokens), "
        "validation %d docs; skipped %s",
        totals["files"],
        n_already_done,
        seconds,
        train["docs"],
        train["bytes"] / 1e6,
        train["tokens"],
        validation["docs"],
        totals["skipped"] or "none",
    )


def _log_skips(counts: Mapping) -> None:
    for reason, n in counts["skipped"].items():
        where = ", ".join(counts["first_skipped"][reason])
        log.warning("%s: skipped %d records (%s), first at %s", counts["path"], n, reason, where)


def _ingest_file(job: _Job) -> tuple[str, dict]:
    """Writes one input's shards and its done marker; runs in a worker process."""
    tmp_dir = f"{job.out_dir}/{_TMP_DIR}/{job.stem}"
    _remove_leftovers(job, tmp_dir)
    tf.io.gfile.makedirs(tmp_dir)
    counts = _convert(job, tmp_dir)
    for split in SPLITS:
        for index in range(counts["splits"][split]["shards"]):
            name = _SHARD_NAME.format(split=split, stem=job.stem, index=index)
            tf.io.gfile.rename(f"{tmp_dir}/{name}", f"{job.out_dir}/{name}", overwrite=True)
    marker = {"settings": job.settings.to_json(), "counts": counts}
    with tf.io.gfile.GFile(f"{tmp_dir}/done.json", "w") as f:
        json.dump(marker, f, indent=2)
    done = f"{job.out_dir}/{_DONE_DIR}/{job.stem}.json"
    tf.io.gfile.rename(f"{tmp_dir}/done.json", done, overwrite=True)
    tf.io.gfile.rmtree(tmp_dir)
    return job.stem, counts


def _remove_leftovers(job: _Job, tmp_dir: str) -> None:
    """Removes what an interrupted run left of this input: temp files and moved shards."""
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    for split in SPLITS:
        own_shard = re.compile(rf"{split}-{re.escape(job.stem)}-\d{{5}}\.tfrecord")
        for path in tf.io.gfile.glob(f"{job.out_dir}/{split}-{job.stem}-*.tfrecord"):
            if own_shard.fullmatch(os.path.basename(path)):  # not stem "a-b" when redoing "a"
                tf.io.gfile.remove(path)


def _convert(job: _Job, tmp_dir: str) -> dict:
    """Streams the input's records into per-split shard writers; returns the counts."""
    settings = job.settings
    vocab = _vocab(settings.vocab_path) if settings.vocab_path else None
    name = os.path.basename(job.path)
    writers = {
        split: _ShardWriter(tmp_dir, split, job.stem, settings.docs_per_shard) for split in SPLITS
    }
    skipped, first_skipped = Counter(), {}
    where = "the start of the file"
    try:
        for record in read_records(job.path, columns=settings.columns):
            where = record.where
            converted = _convert_record(record, job.path, settings, vocab)
            if isinstance(converted, _Skip):
                skipped[converted.reason] += 1
                if skipped[converted.reason] <= _SKIPS_LOGGED:
                    first_skipped.setdefault(converted.reason, []).append(where)
                continue
            split = (
                "validation"
                if _is_validation(name, record.index, settings.validation_fraction)
                else "train"
            )
            record_bytes = _serialized(converted.features)
            writers[split].write(record_bytes, converted.text_bytes, converted.tokens)
    except IngestError:
        raise
    except Exception as error:
        raise IngestError(f"{job.path} (at {where}): {type(error).__name__}: {error}") from error
    finally:
        for writer in writers.values():
            writer.close()
    return {
        "path": job.path,
        "splits": {split: writers[split].counts() for split in SPLITS},
        "skipped": dict(sorted(skipped.items())),
        "first_skipped": dict(sorted(first_skipped.items())),
    }


def _convert_record(
    record: Record, path: str, settings: _Settings, vocab: seqio.Vocabulary | None
) -> _Converted | _Skip:
    """The record's features, or the reason to skip a document (instructions were checked)."""
    if settings.instruction:
        texts = dict(zip((PROMPT, RESPONSE), settings.instruction.pair(record, path), strict=True))
    else:
        text = _document(record, settings)
        if isinstance(text, _Skip):
            return text
        texts = {TEXT_FEATURE: text}
    raw = {name: text.encode("utf-8") for name, text in texts.items()}
    features = {name: _bytes_feature(value) for name, value in raw.items()}
    for field in settings.meta_fields:
        features[field] = _bytes_feature(_meta_bytes(record.fields.get(field)))
    tokens = 0
    if vocab is not None:
        for name, text in texts.items():
            ids = vocab.encode(text)
            features[_IDS_FEATURE[name]] = _int64_feature(ids)
            tokens += len(ids)
    return _Converted(features, sum(map(len, raw.values())), tokens)


def _document(record: Record, settings: _Settings) -> str | _Skip:
    """The record's document text, or the reason to skip it."""
    if record.problem:
        return _Skip(record.problem)
    text = record.fields.get(settings.text_field)
    if text is None:
        return _Skip("missing_field")
    if isinstance(text, bytes):  # Parquet binary columns
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return _Skip(INVALID_UTF8)
    if not isinstance(text, str):
        return _Skip("not_a_string")
    if not text.strip():
        return _Skip("empty")
    if settings.max_doc_chars and len(text) > settings.max_doc_chars:
        return _Skip("too_long")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which JSON's \ud800 escapes can produce
        return _Skip(INVALID_UTF8)
    return text


def _meta_bytes(value: object) -> bytes:
    """Metadata as bytes: strings as they are, missing as empty, anything else as JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    return json.dumps(value).encode()


def _is_validation(name: str, index: int, fraction: float) -> bool:
    """A fixed pseudo-random draw per (file name, record index): reruns split identically."""
    digest = hashlib.blake2b(f"{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64 < fraction


def _serialized(features: Mapping[str, tf.train.Feature]) -> bytes:
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString(deterministic=True)  # same bytes in every process


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


@functools.cache
def _vocab(path: str) -> seqio.SentencePieceVocabulary:
    """Loaded once per worker process."""
    return load_vocab(path)


class _ShardWriter:
    """Writes one split's records into shards of ``docs_per_shard``, opened on first use."""

    def __init__(self, directory: str, split: str, stem: str, docs_per_shard: int):
        self._path = f"{directory}/{_SHARD_NAME}"
        self._split, self._stem, self._docs_per_shard = split, stem, docs_per_shard
        self._writer: tf.io.TFRecordWriter | None = None
        self._docs = self._bytes = self._tokens = self._shards = 0

    def write(self, record: bytes, text_bytes: int, tokens: int) -> None:
        if self._docs % self._docs_per_shard == 0:
            self.close()
            path = self._path.format(split=self._split, stem=self._stem, index=self._shards)
            self._writer = tf.io.TFRecordWriter(path)
            self._shards += 1
        self._writer.write(record)
        self._docs += 1
        self._bytes += text_bytes
        self._tokens += tokens

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def counts(self) -> dict[str, int]:
        return {
            "docs": self._docs,
            "shards": self._shards,
            "bytes": self._bytes,
            "tokens": self._tokens,
        }
