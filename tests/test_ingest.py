"""`codemix ingest` on small dumps written here: formats, tokens, resume, bad input, workers."""

import json
import logging
import operator
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf
import zstandard

from codemix_jax import cli
from codemix_jax.data import load_vocab
from codemix_jax.data.ingest import ingest
from codemix_jax.data.ingest_readers import IngestError

EOS = 1
DOCS = [
    {
        "text": f"def f{i}(x):\n    return x * {i}  # naïve 🙂\n"
        if i % 2
        else f"Prose number {i}.",
        "lang": "python" if i % 2 else "en",
        "repo": f"org/repo{i % 3}",
    }
    for i in range(24)
]


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_bytes(jsonl_bytes(records))


def write_zst(path: Path, records: list[dict]) -> None:
    """Two zstd frames, as parallel compressors write them."""
    data, half = jsonl_bytes(records), len(records) // 2
    first = len(jsonl_bytes(records[:half]))
    compress = zstandard.ZstdCompressor().compress
    path.write_bytes(compress(data[:first]) + compress(data[first:]))


def write_parquet(path: Path, records: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)


WRITERS = {"jsonl": write_jsonl, "jsonl.zst": write_zst, "parquet": write_parquet}


def read_split(out_dir: Path, split: str) -> list[dict]:
    """Every example of a split, shards in name order, features decoded to Python values."""
    examples = []
    for path in sorted(tf.io.gfile.glob(f"{out_dir}/{split}-*.tfrecord")):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            features = tf.train.Example.FromString(record).features.feature
            examples.append(
                {
                    name: list(f.int64_list.value) if name == "targets" else f.bytes_list.value[0]
                    for name, f in features.items()
                }
            )
    return examples


def shard_files(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.glob("*.tfrecord"))}


def make_inputs(root: Path, n_files: int = 3) -> str:
    """``n_files`` JSONL inputs that split DOCS between them; returns their glob."""
    root.mkdir()
    for k in range(n_files):
        write_jsonl(root / f"part-{k}.jsonl", DOCS[k::n_files])
    return str(root / "*.jsonl")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_round_trips_with_meta(tmp_path, fmt):
    WRITERS[fmt](tmp_path / f"dump.{fmt}", DOCS)
    out_dir = tmp_path / "out"
    manifest = ingest(
        inputs=[str(tmp_path / f"dump.{fmt}")],
        out_dir=str(out_dir),
        meta_fields=("lang", "repo"),
        validation_fraction=0.3,
        docs_per_shard=4,
    )

    features = {name: tf.io.FixedLenFeature([], tf.string) for name in ("text", "lang", "repo")}
    patterns = {split: f"{out_dir}/{split}-*.tfrecord" for split in ("train", "validation")}
    source = seqio.TFExampleDataSource(patterns, feature_description=features)
    read = {
        split: [
            {name: value.decode() for name, value in example.items()}
            for example in source.get_dataset(split=split, shuffle=False).as_numpy_iterator()
        ]
        for split in patterns
    }
    assert read["train"] and read["validation"]
    by_text = operator.itemgetter("text")
    assert sorted(read["train"] + read["validation"], key=by_text) == sorted(DOCS, key=by_text)
    assert "targets" not in read_split(out_dir, "train")[0]
    counts = manifest["inputs"]["dump"]["splits"]
    assert counts["train"] == {
        "docs": len(read["train"]),
        "shards": -(-len(read["train"]) // 4),
        "bytes": sum(len(doc["text"].encode()) for doc in read["train"]),
        "tokens": 0,
    }
    assert (out_dir / "train-dump-00000.tfrecord").exists()
    assert json.loads((out_dir / "ingest_manifest.json").read_text()) == manifest


def test_targets_are_the_texts_sentencepiece_ids_without_eos(tmp_path, local_data):
    write_jsonl(tmp_path / "code.jsonl", DOCS)
    manifest = ingest(
        inputs=[str(tmp_path / "code.jsonl")],
        out_dir=str(tmp_path / "out"),
        vocab_path=local_data.vocab_path,
        validation_fraction=0,
    )
    vocab = load_vocab(local_data.vocab_path)
    examples = read_split(tmp_path / "out", "train")
    assert [vocab.decode(example["targets"]) for example in examples] == [d["text"] for d in DOCS]
    assert all(example["targets"][-1] != EOS for example in examples)
    total = sum(len(example["targets"]) for example in examples)
    assert manifest["totals"]["splits"]["train"]["tokens"] == total
    assert manifest["vocab_path"] == local_data.vocab_path


def test_rerun_skips_finished_files_and_redoes_the_interrupted_one(tmp_path, caplog):
    pattern = make_inputs(tmp_path / "in")
    settings = {"validation_fraction": 0.3, "docs_per_shard": 3, "workers": 1}
    clean = ingest(inputs=[pattern], out_dir=str(tmp_path / "clean"), **settings)
    out_dir = tmp_path / "out"
    ingest(inputs=[pattern], out_dir=str(out_dir), **settings)
    # Simulate part-2 interrupted: no marker, its shards gone, but a half-written temp shard and a
    # shard moved in before the interruption (by a run over a longer version of the file) remain.
    (out_dir / ".done" / "part-2.json").unlink()
    for shard in out_dir.glob("*-part-2-*.tfrecord"):
        shard.unlink()
    (out_dir / ".tmp" / "part-2").mkdir(parents=True)
    (out_dir / ".tmp" / "part-2" / "train-part-2-00000.tfrecord").write_bytes(b"half")
    (out_dir / "train-part-2-00009.tfrecord").write_bytes(b"stale")
    kept = {path.name: path.stat().st_mtime_ns for path in out_dir.glob("*-part-[01]-*.tfrecord")}

    with caplog.at_level(logging.INFO):
        rerun = ingest(inputs=[pattern], out_dir=str(out_dir), **settings)

    assert {name: (out_dir / name).stat().st_mtime_ns for name in kept} == kept
    assert f"skipping {tmp_path}/in/part-0.jsonl: already ingested" in caplog.text
    assert "part-2.jsonl: already" not in caplog.text
    assert shard_files(out_dir) == shard_files(tmp_path / "clean")
    assert list((out_dir / ".tmp").iterdir()) == []
    assert rerun == clean


def test_rerun_with_other_settings_fails(tmp_path):
    pattern = make_inputs(tmp_path / "in", n_files=1)
    ingest(inputs=[pattern], out_dir=str(tmp_path / "out"))
    with pytest.raises(IngestError, match=r"part-0\.jsonl was ingested .* with settings"):
        ingest(inputs=[pattern], out_dir=str(tmp_path / "out"), text_field="content")


def test_bad_jsonl_records_are_skipped_and_counted(tmp_path, caplog):
    good = [{"text": "kept one"}, {"text": "kept two"}]
    lines = [
        json.dumps(good[0]).encode(),
        json.dumps({"text": ""}).encode(),  # line 2: empty
        json.dumps({"text": " \n\t"}).encode(),  # line 3: whitespace only
        b'{"text": "caf\xe9"}',  # line 4: Latin-1, not UTF-8
        b'{"text": "unterminated',  # line 5: bad JSON
        b"[1, 2]",  # line 6: JSON, but not an object
        json.dumps({"content": "wrong field"}).encode(),  # line 7
        json.dumps({"text": "x" * 51}).encode(),  # line 8: longer than max_doc_chars
        b'{"text": "lone \\ud800 surrogate"}',  # line 9: valid JSON, not encodable as UTF-8
        json.dumps({"text": 42}).encode(),  # line 10
        json.dumps(good[1]).encode(),
    ]
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    with caplog.at_level(logging.WARNING):
        manifest = ingest(
            inputs=[str(path)], out_dir=str(tmp_path / "out"), max_doc_chars=50, workers=1
        )

    entry = manifest["inputs"]["dirty"]
    assert entry["skipped"] == {
        "empty": 2,
        "invalid_json": 2,
        "invalid_utf8": 2,
        "missing_field": 1,
        "not_a_string": 1,
        "too_long": 1,
    }
    assert entry["first_skipped"]["invalid_utf8"] == ["line 4", "line 9"]
    assert entry["first_skipped"]["invalid_json"] == ["line 5", "line 6"]
    examples = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "validation")
    assert sorted(example["text"].decode() for example in examples) == ["kept one", "kept two"]
    assert f"{path}: skipped 2 records (invalid_json), first at line 5, line 6" in caplog.text


def test_parquet_bad_values_are_skipped_and_counted(tmp_path):
    texts = [b"fine", b"\xff\xfe not utf-8", None, b"   ", b"also fine"]
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary())}), path)
    manifest = ingest(inputs=[str(path)], out_dir=str(tmp_path / "out"), validation_fraction=0)
    assert manifest["inputs"]["raw"]["skipped"] == {
        "empty": 1,
        "invalid_utf8": 1,
        "missing_field": 1,
    }
    assert manifest["inputs"]["raw"]["first_skipped"]["invalid_utf8"] == ["row 1"]
    assert [e["text"] for e in read_split(tmp_path / "out", "train")] == [b"fine", b"also fine"]


def test_parquet_without_the_text_field_names_file_field_and_columns(tmp_path):
    path = tmp_path / "wrong.parquet"
    write_parquet(path, [{"content": "a", "lang": "en"}])
    with pytest.raises(IngestError, match=r"wrong\.parquet.*'text'.*\['content', 'lang'\]"):
        ingest(inputs=[str(path)], out_dir=str(tmp_path / "out"))


def test_corrupt_file_fails_naming_it(tmp_path):
    (tmp_path / "broken.jsonl.zst").write_bytes(b"this is not zstd at all")
    with pytest.raises(IngestError, match=r"broken\.jsonl\.zst"):
        ingest(inputs=[str(tmp_path / "*.zst")], out_dir=str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tfrecord"))


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (["{root}/nothing-*.jsonl"], FileNotFoundError, "nothing-\\*.jsonl' matches no file"),
        (["{root}/a/x.jsonl", "{root}/b/x.jsonl.zst"], IngestError, "share the stem 'x'"),
        (["{root}/a/notes.txt"], IngestError, "notes.txt: unsupported input format"),
    ],
)
def test_bad_inputs_fail_naming_them(tmp_path, inputs, error, message):
    for name in ("a/x.jsonl", "b/x.jsonl.zst", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(error, match=message):
        ingest(inputs=[i.format(root=tmp_path) for i in inputs], out_dir=str(tmp_path / "out"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation_fraction": 1.0}, "validation_fraction must be in"),
        ({"docs_per_shard": 0}, "docs_per_shard must be >= 1, got 0"),
        ({"max_doc_chars": -1}, "max_doc_chars must be >= 0"),
        ({"meta_fields": ("targets",)}, "meta_fields must be distinct and not named"),
        ({"workers": 0}, "workers must be >= 1, got 0"),
    ],
)
def test_bad_settings_fail_naming_the_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ingest(inputs=[str(tmp_path / "*.jsonl")], out_dir=str(tmp_path / "out"), **overrides)


def test_two_workers_write_what_one_worker_writes(tmp_path):
    pattern = make_inputs(tmp_path / "in")
    settings = {"inputs": [pattern], "meta_fields": ["lang"], "docs_per_shard": 3}
    one = ingest(out_dir=str(tmp_path / "one"), workers=1, **settings)
    two = ingest(out_dir=str(tmp_path / "two"), workers=2, **settings)
    assert one == two
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")
    assert len(shard_files(tmp_path / "one")) > 3


def test_cli_ingest_splits_meta_fields(tmp_path):
    pattern = make_inputs(tmp_path / "in", n_files=2)
    out_dir = tmp_path / "out"
    args = ["ingest", "--input", pattern, "--out_dir", str(out_dir), "--meta_fields", "lang,repo"]
    assert cli.main([*args, "--validation_fraction", "0", "--workers", "1"]) == 0
    examples = read_split(out_dir, "train")
    assert len(examples) == len(DOCS)
    assert set(examples[0]) == {"text", "lang", "repo"}
    assert os.path.exists(out_dir / ".done" / "part-1.json")
