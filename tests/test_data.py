"""The data path on a small real corpus: shards, vocab, packing, token-share mixing, host split."""

import json
import os
import shutil

import gin
import numpy as np
import pytest
import tensorflow as tf

from codemix_jax.data import SOURCES, MixtureInput, load_vocab, pack_rows
from codemix_jax.data.corpus import code_documents, read_documents, write_corpus
from codemix_jax.data.mixture import CorruptDataError
from codemix_jax.data.sources import local_sources

EOS = 1
DEMO_SHARES = {"code": 0.5, "text": 0.4, "markup": 0.1}


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """Other tests parse gin files; their MixtureInput bindings must not leak into these."""
    gin.clear_config()


def mixture(local_data, **overrides) -> MixtureInput:
    kwargs = {
        "sources": local_sources(corpus_dir=local_data.corpus_dir),
        "vocab_path": local_data.vocab_path,
        "shares": DEMO_SHARES,
        "seq_len": 32,
        "global_batch_size": 16,
        **overrides,
    }
    return MixtureInput(**kwargs)


def documents(local_data, source: str, split: str) -> list[str]:
    return list(read_documents(corpus_dir=local_data.corpus_dir, source=source, split=split))


def take(batches, n: int) -> list[dict[str, np.ndarray]]:
    return [next(batches) for _ in range(n)]


def test_corpus_has_shards_per_source_and_split(local_data):
    with open(os.path.join(local_data.corpus_dir, "manifest.json")) as f:
        manifest = json.load(f)
    for source in SOURCES:
        entry = manifest["sources"][source]
        for split in ("train", "validation"):
            shards = tf.io.gfile.glob(f"{local_data.corpus_dir}/{source}/{split}-*-of-*.tfrecord")
            assert len(shards) == entry[split]["shards"] >= 1
            assert len(documents(local_data, source, split)) == entry[split]["docs"]
    assert manifest["sources"]["code"]["train"]["shards"] > 1


@pytest.mark.parametrize("index", range(len(SOURCES)), ids=SOURCES)
def test_task_rows_decode_to_the_first_document(local_data, index):
    source = local_sources(corpus_dir=local_data.corpus_dir)[index]
    rows = (
        source.task(vocab_path=local_data.vocab_path)
        .get_dataset(
            sequence_length={"targets": 64}, split="validation", shuffle=False, num_epochs=1
        )
        .as_numpy_iterator()
    )
    tokens = []
    while EOS not in tokens:
        row = next(rows)
        assert set(row) == {"targets", "inputs", "segment_ids", "positions"}
        assert row["targets"].shape == (64,)
        tokens.extend(row["targets"].tolist())
    first_doc = documents(local_data, source.name, "validation")[0]
    assert load_vocab(local_data.vocab_path).decode(tokens[: tokens.index(EOS)]) == first_doc


def test_corpus_skips_undecodable_and_empty_files(tmp_path):
    root = tmp_path / "stdlib"
    (root / "site-packages").mkdir(parents=True)
    (root / "good.py").write_text("def f():\n\treturn 1\n")
    (root / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    (root / "empty.py").write_text("  \n")
    (root / "site-packages" / "installed.py").write_text("import os\n")
    out_dir = str(tmp_path / "corpus")
    counts = write_corpus(
        out_dir=out_dir,
        documents={"code": code_documents(root)},
        max_bytes_per_source=None,
        validation_fraction=0.0,
        docs_per_shard=4,
    )
    assert counts == {"code": {"train": 1, "validation": 0}}
    with open(os.path.join(out_dir, "manifest.json")) as f:
        assert json.load(f)["sources"]["code"]["skipped"] == 2
    docs = read_documents(corpus_dir=out_dir, source="code", split="train")
    assert list(docs) == ["def f():\n\treturn 1\n"]


def test_vocab_round_trips_code_and_uses_seqio_ids(local_data):
    vocab = load_vocab(local_data.vocab_path)
    code = "class A:\n\tdef f(self, x):\n        return  x * 1234  # é 日本\r\n\n\t\t  pass  \n"
    assert vocab.decode(vocab.encode(code)) == code
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 2, 2048)


def test_pack_rows_cuts_full_rows_with_exact_segments():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20]]
    dataset = tf.data.Dataset.from_generator(
        lambda: ({"targets": doc} for doc in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    rows = [
        {key: value.tolist() for key, value in row.items()}
        for row in pack_rows(dataset, seq_len=4).as_numpy_iterator()
    ]
    assert rows == [
        {"targets": [5, 6, 7, 8], "segment_ids": [1, 1, 1, 2],
         "positions": [0, 1, 2, 0], "inputs": [0, 5, 6, 0]},
        {"targets": [9, 10, 11, 12], "segment_ids": [1, 2, 2, 2],
         "positions": [0, 0, 1, 2], "inputs": [0, 0, 10, 11]},
        {"targets": [13, 14, 15, 16], "segment_ids": [1, 1, 1, 1],
         "positions": [0, 1, 2, 3], "inputs": [0, 13, 14, 15]},
        {"targets": [17, 18, 19, 20], "segment_ids": [1, 1, 1, 2],
         "positions": [0, 1, 2, 0], "inputs": [0, 17, 18, 0]},
    ]  # fmt: skip
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows(dataset, seq_len=0)


@pytest.mark.parametrize(
    ("shares", "rows"),
    [
        ({"code": 0.5, "text": 0.375, "markup": 0.125}, [4, 3, 1]),
        ({"code": 0.25, "text": 0.0, "markup": 0.75}, [2, 0, 6]),
    ],
    ids=["three_sources", "zero_share"],
)
def test_every_batch_has_the_exact_rows_per_source(local_data, shares, rows):
    """Shares that are whole rows of an 8-row batch: every batch holds exactly those counts."""
    for batch in take(mixture(local_data, shares=shares, global_batch_size=8).host_batches(), 4):
        assert batch["targets"].shape == (8, 32) and batch["source_id"].shape == (8,)
        assert all(value.dtype == np.int32 for value in batch.values())
        assert (batch["segment_ids"] > 0).all()  # full rows: no padding
        shifted = np.where(batch["positions"][:, 1:] == 0, 0, batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["inputs"][:, 1:], shifted)
        assert np.bincount(batch["source_id"], minlength=3).tolist() == rows


def test_batches_deliver_the_planned_rows_across_a_phase_change(local_data):
    """Uneven shares and a phase change at batch 3: the pipeline's rows are the plan's."""
    config = mixture(
        local_data,
        shares=None,
        phases=[(0, {"code": 0.3, "text": 0.7}), (3, {"code": 0.2, "text": 0.1, "markup": 0.7})],
        global_batch_size=10,
    )
    planned = config.rows_per_source(range(6))
    assert planned[:3, 2].sum() == 0 and planned[3:, 2].sum() == 21
    for step, batch in enumerate(take(config.host_batches(), 6)):
        assert np.bincount(batch["source_id"], minlength=3).tolist() == planned[step].tolist()


AWKWARD = [
    (0, {"code": 0.3333333, "text": 0.3333333, "markup": 0.3333333}),  # sums to 0.9999999
    (20_000, {"code": 0.1, "text": 0.2, "markup": 0.7000009}),  # sums to 1.0000009
    (35_000, {"code": 0.0, "text": 0.9999995, "markup": 0.0000005}),
    (45_000, {"code": 0.9999991}),  # one source alone
]


@pytest.mark.parametrize("batch_size", [512, 24])
def test_row_counts_are_exact_for_any_accepted_shares(local_data, batch_size):
    """Over 60,000 batches: each has exactly ``batch_size`` rows, and within a phase every
    source's running row count stays within one row of its share of the rows so far."""
    config = mixture(local_data, shares=None, phases=AWKWARD, global_batch_size=batch_size)
    counts = config.rows_per_source(range(60_000))
    assert (counts >= 0).all()
    assert (counts.sum(axis=1) == batch_size).all()
    ends = [start for start, _ in AWKWARD[1:]] + [len(counts)]
    for (start, shares), end in zip(AWKWARD, ends, strict=True):
        share = np.array([shares.get(name, 0.0) for name in SOURCES]) / sum(shares.values())
        so_far = np.cumsum(counts[start:end], axis=0)
        batches_so_far = np.arange(1, end - start + 1)[:, None]
        assert np.abs(so_far - share * batches_so_far * batch_size).max() <= 1.0
        assert (counts[start:end, share == 0] == 0).all()


def test_hosts_read_disjoint_rows(local_data):
    config = mixture(local_data)
    rows = []
    for index in range(2):
        batches = take(config.host_batches(process_index=index, process_count=2), 20)
        assert all(batch["targets"].shape == (8, 32) for batch in batches)
        rows.append({row.tobytes() for batch in batches for row in batch["targets"]})
    assert len(rows[0]) > 100 and len(rows[1]) > 100
    assert not rows[0] & rows[1]


def test_batches_are_deterministic_per_seed(local_data):
    first, again, other = (
        take(mixture(local_data, seed=seed).host_batches(), 3) for seed in (0, 0, 1)
    )
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any((a["targets"] != c["targets"]).any() for a, c in zip(first, other, strict=True))


def test_missing_corpus_or_vocab_names_the_path_and_the_fix(local_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing/code/train.*codemix build-corpus"):
        missing = local_sources(corpus_dir=str(tmp_path / "missing"))
        mixture(local_data, sources=missing).host_batches()
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*codemix train-vocab"):
        mixture(local_data, vocab_path=str(tmp_path / "nope.model")).host_batches()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shares": {"code": 0.5, "text": 0.4}}, "sum to 1"),
        ({"shares": {"code": 0.6, "text": 0.4000011}}, "sum to 1"),
        ({"shares": {"code": 0.5, "video": 0.5}}, "'video'"),
        ({"shares": {"code": 1.5, "text": -0.5}}, ">= 0"),
        ({"seq_len": 0}, "seq_len"),
    ],
)
def test_bad_config_fails_naming_the_value(local_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        mixture(local_data, **overrides)


def test_batch_must_divide_over_hosts(local_data):
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        mixture(local_data).host_batches(process_count=3)


def test_corrupt_shard_is_named(local_data, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(local_data.corpus_dir, corpus)
    for shard in (corpus / "text").glob("train-*.tfrecord"):
        damaged = bytearray(shard.read_bytes())
        damaged[100:110] = b"X" * 10  # inside the first record: its CRC no longer matches
        shard.write_bytes(bytes(damaged))
    batches = mixture(local_data, sources=local_sources(corpus_dir=str(corpus))).host_batches()
    with pytest.raises(CorruptDataError, match=rf"corrupt input file {corpus}/text/train-\d+"):
        next(batches)
