"""The local demo corpus: files every Python install has, written as TFRecord shards per source.

code = stdlib ``.py`` sources, text = ``pydoc_data`` topic prose, markup = package READMEs and
long descriptions. Nothing is downloaded, so any machine builds the same corpus offline.
"""

import hashlib
import json
import math
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from pydoc_data import topics

import tensorflow as tf

SOURCES = ("code", "text", "markup")
SPLITS = ("train", "validation")
TEXT_FEATURE = "text"
SHARD_NAME = "{split}-{index:05d}-of-{count:05d}.tfrecord"
SHARD_GLOB = "{corpus_dir}/{source}/{split}-*-of-*.tfrecord"

# Installed packages are not stdlib code, and pydoc_data/topics.py is the text source's prose.
_NOT_CODE_DIRS = frozenset({"site-packages", "dist-packages", "pydoc_data"})
_README_NAMES = frozenset({"readme.md", "readme.rst"})

Document = tuple[str, bytes]  # (stable name, raw bytes); decoding is checked when written


def code_documents(root: Path) -> Iterator[Document]:
    """Python sources under ``root``, by relative path."""
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if path.is_file() and not _NOT_CODE_DIRS.intersection(relative.parts):
            yield relative.as_posix(), path.read_bytes()


def text_documents() -> Iterator[Document]:
    """One document per pydoc help topic: English prose that ships with Python."""
    for name, body in sorted(topics.topics.items()):
        yield name, body.encode()


def markup_documents(roots: Sequence[Path]) -> Iterator[Document]:
    """Package long descriptions (METADATA bodies) and README.md/.rst files under ``roots``."""
    for root in roots:
        for path in sorted(root.glob("*.dist-info/METADATA")):
            # The body follows the e-mail style header block.
            yield path.relative_to(root).as_posix(), path.read_bytes().partition(b"\n\n")[2]
        for path in sorted(root.rglob("*")):
            if path.name.lower() in _README_NAMES and path.is_file():
                yield path.relative_to(root).as_posix(), path.read_bytes()


def build_local_corpus(
    *,
    out_dir: str,
    max_bytes_per_source: int | None = None,
    validation_fraction: float = 0.02,
    docs_per_shard: int = 256,
) -> dict[str, dict[str, int]]:
    """Builds the demo corpus from this Python install; returns {source: {split: n_docs}}."""
    paths = sysconfig.get_paths()
    site_packages = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    documents = {
        "code": code_documents(Path(paths["stdlib"])),
        "text": text_documents(),
        "markup": markup_documents(site_packages),
    }
    return write_corpus(
        out_dir=out_dir,
        documents=documents,
        max_bytes_per_source=max_bytes_per_source,
        validation_fraction=validation_fraction,
        docs_per_shard=docs_per_shard,
    )


def write_corpus(
    *,
    out_dir: str,
    documents: Mapping[str, Iterable[Document]],
    max_bytes_per_source: int | None,
    validation_fraction: float,
    docs_per_shard: int,
) -> dict[str, dict[str, int]]:
    """Writes each source's documents as train/validation shards plus ``manifest.json``.

    Documents are taken in the order of a hash of their name, so a byte cap keeps a sample of the
    whole source (not its alphabetical head), and the first ``validation_fraction`` of them (at
    least one when there are two or more) form the validation split. Same inputs, same shards.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    if max_bytes_per_source is not None and max_bytes_per_source < 1:
        raise ValueError(f"max_bytes_per_source must be >= 1 or None, got {max_bytes_per_source}")
    manifest = {
        "max_bytes_per_source": max_bytes_per_source,
        "validation_fraction": validation_fraction,
        "docs_per_shard": docs_per_shard,
        "sources": {},
    }
    for source, docs in documents.items():
        texts, skipped = _select(docs, max_bytes_per_source)
        n_validation = math.ceil(validation_fraction * (len(texts) - 1))
        splits = {"validation": texts[:n_validation], "train": texts[n_validation:]}
        source_dir = f"{out_dir}/{source}"
        _clear_shards(source_dir)
        entry = {
            split: _write_split(split_texts, source_dir, split, docs_per_shard)
            for split, split_texts in splits.items()
        }
        manifest["sources"][source] = {"skipped": skipped, **entry}
        print(
            f"[build-corpus] {source}: train {entry['train']['docs']} docs "
            f"({entry['train']['bytes'] / 1e6:.1f} MB, {entry['train']['shards']} shards), "
            f"validation {entry['validation']['docs']} docs; "
            f"skipped {skipped} non-UTF-8 or empty",
            flush=True,
        )
    with tf.io.gfile.GFile(f"{out_dir}/manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"[build-corpus] wrote {out_dir}/manifest.json", flush=True)
    return {
        source: {split: entry[split]["docs"] for split in SPLITS}
        for source, entry in manifest["sources"].items()
    }


def find_shards(pattern: str) -> list[str]:
    """Sorted files matching ``pattern``; fails with the fix when the corpus was never built."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"No corpus shards match {pattern!r}; run `codemix build-corpus --out_dir DIR` first."
        )
    return files


def read_documents(*, corpus_dir: str, source: str, split: str) -> Iterator[str]:
    """The documents of one source's split, in shard order."""
    files = find_shards(SHARD_GLOB.format(corpus_dir=corpus_dir, source=source, split=split))
    for record in tf.data.TFRecordDataset(files).as_numpy_iterator():
        feature = tf.train.Example.FromString(record).features.feature[TEXT_FEATURE]
        yield feature.bytes_list.value[0].decode()


def _select(docs: Iterable[Document], max_bytes: int | None) -> tuple[list[str], int]:
    """Decodes documents in name-hash order until ``max_bytes``; counts the unusable ones."""
    texts, skipped, total = [], 0, 0
    for _, raw in sorted(docs, key=lambda doc: (name_hash(doc[0]), doc[0])):
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if not text.strip():
            skipped += 1
            continue
        texts.append(text)
        total += len(raw)
    return texts, skipped


def name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _clear_shards(source_dir: str) -> None:
    """Removes a previous build's shards, which the glob would otherwise still match."""
    tf.io.gfile.makedirs(source_dir)
    for path in tf.io.gfile.glob(f"{source_dir}/*.tfrecord"):
        tf.io.gfile.remove(path)


def _write_split(
    texts: Sequence[str], source_dir: str, split: str, docs_per_shard: int
) -> dict[str, int]:
    count = math.ceil(len(texts) / docs_per_shard)
    for index in range(count):
        path = f"{source_dir}/{SHARD_NAME.format(split=split, index=index, count=count)}"
        with tf.io.TFRecordWriter(path) as writer:
            for text in texts[index * docs_per_shard : (index + 1) * docs_per_shard]:
                writer.write(_example(text).SerializeToString())
    return {"docs": len(texts), "bytes": sum(len(t.encode()) for t in texts), "shards": count}


def _example(text: str) -> tf.train.Example:
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
    return tf.train.Example(features=tf.train.Features(feature={TEXT_FEATURE: feature}))
