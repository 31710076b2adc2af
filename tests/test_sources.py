"""Sources: each storage format through its real seqio Task, paper A gin grid, mixture-report."""

import dataclasses
import glob
import json

import gin
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

from codemix_jax import cli, gin_config
from codemix_jax.data import MixtureInput, load_vocab
from codemix_jax.data.report import ShareReport, report_table
from codemix_jax.data.sources import CATEGORIES, Source, local_sources

EOS = 1
SEQ_LEN = 32
ROW_KEYS = {"targets", "inputs", "segment_ids", "positions"}
PAPER_A = "gin/data/sources/paper_a.gin"
MIXTURES = sorted(glob.glob(f"{gin_config.REPO_ROOT}/gin/data/mixtures/*.gin"))
DOCS = [
    *(f"def scale_{i}(x):\n\treturn x * {i}  # ok\n" for i in range(8)),
    *(f"Paragraph {i}: prose about loops, lists and their lengths.\n" for i in range(8)),
]


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """Source is gin-configurable: bindings parsed by one test must not reach another's Sources."""
    gin.clear_config()
    yield
    gin.clear_config()


class CodemixTinyDocs(tfds.core.GeneratorBasedBuilder):
    """A TFDS data set built in the test's tmp dir: DOCS as train, the first two as validation."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(DOCS),
            "validation": self._generate_examples(DOCS[:2]),
        }

    def _generate_examples(self, docs):
        for index, doc in enumerate(docs):
            yield index, {"text": doc}


def example(text: str, ids: list[int]) -> bytes:
    """A record as `codemix ingest --vocab_path` writes it: the text and its ids without EOS."""
    feature = {
        "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
        "targets": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_records(path: str, records: list[bytes]) -> None:
    if path.endswith(".tfrecord"):
        with tf.io.TFRecordWriter(path) as writer:
            for record in records:
                writer.write(record)
    else:
        writer = ArrayRecordWriter(path, "group_size:1")
        for record in records:
            writer.write(record)
        writer.close()


@pytest.fixture(params=["tfrecord", "arrayrecord"])
def file_source(request, tmp_path, local_data) -> Source:
    """DOCS in one train file of the parametrized format, the first two in a validation file."""
    vocab = load_vocab(local_data.vocab_path)
    records = [example(doc, vocab.encode(doc)) for doc in DOCS]
    ext = "tfrecord" if request.param == "tfrecord" else "array_record"
    write_records(str(tmp_path / f"train-0.{ext}"), records)
    write_records(str(tmp_path / f"validation-0.{ext}"), records[:2])
    return Source(
        name="docs",
        category="code",
        train=str(tmp_path / f"train-*.{ext}"),
        validation=str(tmp_path / f"validation-*.{ext}"),
        format=request.param,
    )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    CodemixTinyDocs(data_dir=data_dir).download_and_prepare()
    return data_dir


def rows(source: Source, vocab_path: str, split: str, **kwargs) -> list[dict[str, np.ndarray]]:
    dataset = source.task(vocab_path=vocab_path).get_dataset(
        sequence_length={"targets": SEQ_LEN}, split=split, **kwargs
    )
    return list(dataset.as_numpy_iterator())


def first_documents(source: Source, vocab_path: str, split: str, count: int) -> list[str]:
    """The first ``count`` documents of the split, decoded from its packed rows (2 epochs, so
    the packer's dropped tail never cuts the first epoch)."""
    tokens = []
    for row in rows(source, vocab_path, split, shuffle=False, num_epochs=2):
        assert set(row) == ROW_KEYS
        assert all(value.shape == (SEQ_LEN,) and value.dtype == np.int32 for value in row.values())
        tokens.extend(row["targets"].tolist())
        if tokens.count(EOS) >= count:
            break
    vocab = load_vocab(vocab_path)
    ends = np.flatnonzero(np.array(tokens) == EOS)[:count]
    return [
        vocab.decode(tokens[start + 1 : end])
        for start, end in zip([-1, *ends[:-1]], ends, strict=True)
    ]


def test_file_formats_read_every_document_in_order(file_source, local_data):
    file_source.require_files("train")
    assert first_documents(file_source, local_data.vocab_path, "train", len(DOCS)) == DOCS
    assert first_documents(file_source, local_data.vocab_path, "validation", 2) == DOCS[:2]


def test_pretokenized_records_give_the_same_rows_as_tokenizing(file_source, local_data):
    pretokenized = dataclasses.replace(file_source, pretokenized=True)
    assert (
        pretokenized.task(vocab_path=local_data.vocab_path).name
        != file_source.task(vocab_path=local_data.vocab_path).name
    )
    kwargs = {"split": "train", "shuffle": True, "seed": 3, "num_epochs": 2}
    from_text = rows(file_source, local_data.vocab_path, **kwargs)
    from_ids = rows(pretokenized, local_data.vocab_path, **kwargs)
    assert len(from_text) > 10
    for text_row, ids_row in zip(from_text, from_ids, strict=True):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(text_row[key], ids_row[key])


def test_tfds_source_reads_the_prepared_splits(tfds_dir, local_data):
    source = Source(
        name="tiny",
        category="text",
        train="codemix_tiny_docs:1.0.0",
        validation="validation",
        format="tfds",
        tfds_data_dir=tfds_dir,
    )
    source.require_files("train")
    train = first_documents(source, local_data.vocab_path, "train", len(DOCS))
    assert sorted(train) == sorted(DOCS)  # TFDS shuffles examples when it prepares them
    validation = first_documents(source, local_data.vocab_path, "validation", 2)
    assert sorted(validation) == sorted(DOCS[:2])


def test_missing_data_names_the_location_and_the_command_that_makes_it(tfds_dir, tmp_path):
    missing = Source(name="python", category="code", train=str(tmp_path / "none/train-*.tfrecord"))
    with pytest.raises(FileNotFoundError, match=r"none/train-\*\.tfrecord.*codemix ingest"):
        missing.require_files("train")
    with pytest.raises(ValueError, match="no 'validation' split"):
        missing.require_files("validation")
    unknown = Source(
        name="c4",
        category="text",
        train="no_such_docs:1.0.0",
        format="tfds",
        tfds_data_dir=tfds_dir,
    )
    with pytest.raises(FileNotFoundError, match=r"no_such_docs:1\.0\.0.*tfds build"):
        unknown.require_files("train")
    tiny = Source(
        name="tiny",
        category="text",
        train="codemix_tiny_docs:1.0.0",
        validation="test",
        format="tfds",
        tfds_data_dir=tfds_dir,
    )
    with pytest.raises(FileNotFoundError, match=r"no split 'test'.*tfds build"):
        tiny.require_files("validation")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"category": "video"}, "unknown category 'video'"),
        ({"format": "parquet"}, "unknown format 'parquet'"),
        ({"name": "code-python"}, "'code-python'"),
        ({"format": "tfds", "train": "c4/en"}, "name:version"),
        ({"tfds_data_dir": "/tmp/tfds"}, "tfds_data_dir"),
    ],
)
def test_bad_source_fails_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        Source(**{"name": "code", "category": "code", "train": "x/train-*.tfrecord", **overrides})


def test_local_sources_are_the_demo_corpus(local_data, tmp_path):
    sources = local_sources(corpus_dir=local_data.corpus_dir)
    assert [(s.name, s.category) for s in sources] == [(c, c) for c in ("code", "text", "markup")]
    for source in sources:
        source.require_files("train")
        source.require_files("validation")
    with pytest.raises(FileNotFoundError, match="codemix build-corpus"):
        local_sources(corpus_dir=str(tmp_path))[0].require_files("train")


def paper_a_mixture(mixture_file: str) -> MixtureInput:
    """The MixtureInput that paper_a.gin and ``mixture_file`` configure (nothing is read)."""
    sizes = ["MixtureInput.seq_len = 8", "MixtureInput.global_batch_size = 8"]
    gin_config.parse([PAPER_A, mixture_file], sizes)
    return MixtureInput()


def code_fractions(shares: dict[str, float]) -> dict[str, float]:
    code = {name: share for name, share in shares.items() if name.startswith("code_")}
    code.pop("code_adjacent", None)
    total = sum(code.values())
    return {name: share / total for name, share in code.items()} if total else {}


def test_paper_a_sources_cover_every_category():
    mixture = paper_a_mixture(MIXTURES[0])
    assert {source.category for source in mixture.sources} == set(CATEGORIES)
    assert all(source.pretokenized for source in mixture.sources)


# Paper A's share of each category per mixture file, as each file's header states it.
CATEGORY_SHARES = {
    "code_0.gin": {"text": 1.0},
    "code_25.gin": {"code": 0.25, "text": 0.75},
    "code_50.gin": {"code": 0.5, "text": 0.5},
    "code_75.gin": {"code": 0.75, "text": 0.25},
    "code_90.gin": {"code": 0.9, "text": 0.1},
    "code_100.gin": {"code": 1.0},
    "cpt_text90_code10.gin": {"code": 0.1, "text": 0.9},
    "code_to_text_init.gin": {"code": 0.8, "markup": 0.2},
    "cooldown.gin": {"code": 0.2, "text": 0.3, "high_quality": 0.5},
    # The quality ablations replace part of code_50's code half (+20 %, +15 %, +10 % of it).
    "code_50_plus_markup.gin": {"code": 0.4, "markup": 0.1, "text": 0.5},
    "code_50_plus_code_adjacent.gin": {"code": 0.425, "code_adjacent": 0.075, "text": 0.5},
    "code_50_plus_synthetic_code.gin": {"code": 0.45, "synthetic_code": 0.05, "text": 0.5},
}


def test_every_mixture_file_has_its_paper_shares():
    assert sorted(CATEGORY_SHARES) == sorted(path.rsplit("/", 1)[-1] for path in MIXTURES)


@pytest.mark.parametrize("mixture_file", MIXTURES, ids=lambda path: path.rsplit("/", 1)[-1])
def test_paper_a_mixtures_are_shares_of_paper_a_sources(mixture_file):
    code_50 = code_fractions(dict(paper_a_mixture("gin/data/mixtures/code_50.gin").shares))
    mixture = paper_a_mixture(mixture_file)
    shares = dict(mixture.shares)
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for source in mixture.sources:
        by_category[source.category] += shares.get(source.name, 0.0)
    expected = {**dict.fromkeys(CATEGORIES, 0.0), **CATEGORY_SHARES[mixture_file.rsplit("/")[-1]]}
    assert by_category == pytest.approx(expected, abs=1e-9)
    fractions = code_fractions(shares)
    if fractions:  # the same language split in every file
        assert fractions == pytest.approx(code_50, abs=1e-9)


@pytest.mark.parametrize(
    ("bindings", "start_step", "expected"),
    [
        ([], 0, {"code": 0.5, "text": 0.4, "markup": 0.1}),
        (["MixtureInput.shares = {'code': 0.2, 'text': 0.3, 'markup': 0.5}"], 0, None),
        (
            [
                "MixtureInput.shares = None",
                "MixtureInput.phases = [(0, {'code': 1.0}), (100, {'text': 0.5, 'markup': 0.5})]",
            ],
            50,
            {"code": 0.25, "text": 0.375, "markup": 0.375},  # steps 50-99, then 100-249
        ),
    ],
    ids=["local_mixture", "markup_heavy", "two_phases"],
)
def test_mixture_report_realizes_configured_shares(
    local_data, capsys, bindings, start_step, expected
):
    flags = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "MixtureInput.seq_len = 32",
        "MixtureInput.global_batch_size = 8",
        *bindings,
    ]
    args = ["mixture-report", "--gin_file", "gin/data/local_mixture.gin", "--batches", "200"]
    args += ["--start_step", str(start_step), "--json"]
    args += [arg for binding in flags for arg in ("--gin_bindings", binding)]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    configured = report["configured"]
    if expected is not None:
        assert configured == pytest.approx(expected)
    total = 200 * 8 * 32
    assert sum(report["tokens"].values()) == total
    # Cumulative rounding is exact to one row (32 tokens) per source (the two phases' shares are
    # whole rows of a batch, so they add nothing).
    for source in ("code", "text", "markup"):
        assert abs(report["tokens"][source] - configured[source] * total) <= 32, (source, report)


def test_report_table_lists_every_source_with_its_difference():
    report = ShareReport(tokens={"code": 300, "text": 700}, configured={"code": 0.25, "text": 0.75})
    lines = report_table(report).splitlines()
    assert lines[1].split() == ["code", "300", "25.00%", "30.00%", "+5.00", "pp"]
    assert lines[2].split() == ["text", "700", "75.00%", "70.00%", "-5.00", "pp"]
    assert lines[3].split() == ["total", "1,000"]


def test_source_whose_records_lack_its_features_is_named(local_data):
    """Pretokenized settings over text shards would parse empty rows and train at loss 0."""
    text_shards = local_sources(corpus_dir=local_data.corpus_dir)[0]
    text_shards.require_files("train")
    with pytest.raises(ValueError, match=r"have no \['targets'\] \(they hold \['text'\]\)"):
        dataclasses.replace(text_shards, pretokenized=True).require_files("train")
