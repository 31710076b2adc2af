"""Readers for raw corpus dumps as they ship: JSONL (plain or zstd-compressed) and Parquet.

Each reader streams one ``Record`` per line or row, so a dump of any size fits in constant memory.
A record that cannot be parsed is still yielded, with the reason, so the caller can count it: one
bad line in a billion must not stop an ingest, but it must not vanish silently either.
"""

import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pyarrow.parquet as pq
import tensorflow as tf
import zstandard

# Longest suffix first, so "a.jsonl.zst" is zstd JSONL with the stem "a".
_SUFFIXES = (".jsonl.zst", ".json.zst", ".zst", ".jsonl", ".json", ".parquet")
_BUFFER_BYTES = 1 << 20
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"


class IngestError(ValueError):
    """Input that ingest refuses to guess about; the message names the file (and line or row)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One line or row: ``fields`` when it parsed, else ``problem`` says why not.

    ``index`` counts every line or row from 0, parsed or not, so it identifies the record stably.
    """

    index: int
    where: str
    fields: Mapping[str, object] | None = None
    problem: str | None = None


def input_stem(path: str) -> str:
    """The file name without its format suffix: ``dir/part-1.jsonl.zst`` -> ``part-1``."""
    name = os.path.basename(path)
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise IngestError(f"{path}: unsupported input format; expected one of {', '.join(_SUFFIXES)}")


def read_records(path: str, *, columns: Sequence[str]) -> Iterator[Record]:
    """Streams the records of ``path``; ``columns`` are the fields the caller will use."""
    input_stem(path)  # fails early on an unsupported suffix
    with io.BufferedReader(_GFileStream(path), buffer_size=_BUFFER_BYTES) as f:
        if path.endswith(".parquet"):
            yield from _parquet_records(f, path, columns)
        elif path.endswith(".zst"):
            yield from _jsonl_records(_zstd_lines(f))
        else:
            yield from _jsonl_records(f)


class _GFileStream(io.RawIOBase):
    """A ``tf.io.gfile`` file (local or gs://) as the standard binary stream pyarrow requires."""

    def __init__(self, path: str):
        self._file = tf.io.gfile.GFile(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._file.seek(offset, whence)
        return self._file.tell()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def _zstd_lines(compressed: io.BufferedReader) -> Iterator[bytes]:
    """Decompressed lines, streamed; ``read_across_frames`` reads multi-frame (parallel) dumps."""
    reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
    yield from io.BufferedReader(reader, buffer_size=_BUFFER_BYTES)


def _jsonl_records(lines: Iterable[bytes]) -> Iterator[Record]:
    for index, line in enumerate(lines):
        where = f"line {index + 1}"
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError:
            yield Record(index, where, problem=INVALID_UTF8)
            continue
        if not decoded.strip():
            yield Record(index, where, fields={})  # a blank line: a record with no text
            continue
        try:
            fields = json.loads(decoded)
        except json.JSONDecodeError:
            fields = None
        if isinstance(fields, dict):
            yield Record(index, where, fields=fields)
        else:
            yield Record(index, where, problem=INVALID_JSON)


def _parquet_records(f: io.BufferedReader, path: str, columns: Sequence[str]) -> Iterator[Record]:
    """Rows one row group at a time, reading only ``columns``; all of them must exist."""
    parquet = pq.ParquetFile(f)
    names = parquet.schema_arrow.names
    missing = [column for column in columns if column not in names]
    if missing:
        raise IngestError(
            f"{path}: Parquet schema has no field {', '.join(map(repr, missing))}; "
            f"its columns are {names}"
        )
    index = 0
    for group in range(parquet.num_row_groups):
        for fields in parquet.read_row_group(group, columns=list(columns)).to_pylist():
            yield Record(index, f"row {index}", fields=fields)
            index += 1
