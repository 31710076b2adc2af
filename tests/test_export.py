"""Hugging Face export: per architecture, transformers (CPU torch, offline) loads the export and
its float32 logits match the JAX model's on random ids and on each source's text at several
lengths; the exported tokenizer gives the vocabulary's ids; refusals leave no folder behind.

Each case's checkpoint is written by the project's ``Checkpoints`` (the train state, the input
position and the meta, as a run writes them) with random params, biases and norm scales
included: freshly initialised ones (zero biases, unit scales) would not show a misplaced one.
"""

import itertools
import os
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import linen as nn

from codemix_jax.checkpoint import Checkpoints, checkpoint_dir, run_identity
from codemix_jax.data import MixtureInput
from codemix_jax.data.corpus import SOURCES, read_documents
from codemix_jax.data.mixture import HostBatches
from codemix_jax.data.sources import local_sources
from codemix_jax.data.vocab import load_vocab
from codemix_jax.export import UnsupportedArchitectureError, UnsupportedVocabularyError, export_hf
from codemix_jax.export.architectures import target_for
from codemix_jax.export.params import SavedParams
from codemix_jax.export.tokenizer import check_settings
from codemix_jax.model import ModelConfig, Transformer, init_params
from codemix_jax.train_state import TrainState
from codemix_jax.trained import TrainedModelError, load_trained, saved_run

SMOKE = "gin/experiments/smoke.gin"
STEP = 3
LENGTHS = (1, 17, 64, 128)
TOLERANCE = 1e-4
TINY = {"vocab_size": 2048, "d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 256}
LLAMA = {"block": "sequential", "norm": "rmsnorm", "mlp": "swiglu", "positions": "rope"}
PAPER_A = {"block": "parallel", "norm": "layernorm", "mlp": "swiglu", "positions": "rope"}
PANGU = {"block": "sequential", "norm": "layernorm", "mlp": "gelu", "positions": "learned"}
# name -> (ModelConfig fields, expected architecture, max_shard_bytes)
CASES = {
    "llama_gqa": ({**LLAMA, "num_kv_heads": 2}, "LlamaForCausalLM", None),
    "llama_untied_bias_head_dim": (
        {**LLAMA, "tie_embeddings": False, "use_bias": True, "head_dim": 24, "scan_layers": False},
        "LlamaForCausalLM",
        None,
    ),
    "paper_a": (PAPER_A, "CohereForCausalLM", None),
    "paper_a_gqa_untied_sharded": (
        {
            **PAPER_A,
            "num_kv_heads": 2,
            "head_dim": 32,
            "tie_embeddings": False,
            "scan_layers": False,
            "rope_theta": 500.0,
        },
        "CohereForCausalLM",
        200_000,
    ),
    "pangu": ({**PANGU, "use_bias": True}, "GPT2LMHeadModel", None),
    "pangu_no_bias_untied": (
        {**PANGU, "tie_embeddings": False, "scan_layers": False},
        "GPT2LMHeadModel",
        None,
    ),
}
# Code with indentation, prose, digits and unusual Unicode (emoji with modifiers and ZWJ
# sequences, CJK, combining marks, NBSP, zero-width characters, characters outside the pieces
# that fall back to bytes, control characters), and text that reads like special tokens.
TOKENIZER_TEXTS = [
    "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\n    else:\n        pass\n\n\n",
    "class A:\r\n    def __init__(self):\r\n\t    self.x = [1, 2, 3]  \t\n",
    "   leading spaces, trailing ones   ",
    "The quick brown fox, it's said, jumped over 12,345.678 lazy dogs in 2024-12-06.",
    "Emoji 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 and CJK 漢字かなカナ 한국어 中文标点\uff0c\u3002",
    "e\u0301 a\u0308 \u1e9b\u0323 combining; NBSP\u00a0here; ZWJ\u200dZWNJ\u200cZWSP\u200b.",
    "\ufeffBOM \u2028 line sep \u202e RTL override \x00\x01\x7f control",
    "\U0001d518\U0001d52b\U0001d526 fraktur \U0001d7d8 and private use \ue000 \U0010fffd",
    "</s> <pad> <unk> <0x41> \u2581 literal markers",
    "",
]


def model_config(fields: dict) -> ModelConfig:
    return ModelConfig(**{**TINY, **fields})


def random_params(config: ModelConfig, seed: int) -> dict:
    """Params of every kind drawn at random (numpy: nothing to compile): embeddings N(0, 1),
    kernels N(0, 0.1), biases N(0, 0.2), norm scales 1 + N(0, 0.2)."""
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(Transformer(config), jax.random.key(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        scale, offset = {"embedding": (1.0, 0.0), "scale": (0.2, 1.0), "bias": (0.2, 0.0)}.get(
            path[-1].key, (0.1, 0.0)
        )
        return (offset + scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


class Dataset(NamedTuple):
    """The input every case's checkpoint records, and its batches (their position is saved)."""

    input: MixtureInput
    batches: HostBatches


def write_run(run_dir, config: ModelConfig, dataset: Dataset, *, seed: int = 0) -> dict:
    """A run dir as training leaves it: a checkpoint at ``STEP`` and the operative config's
    vocabulary binding; returns the params saved."""
    params = random_params(config, seed)
    state = TrainState(
        step=jnp.asarray(STEP, jnp.int32), params=params, opt_state=optax.adam(1e-3).init(params)
    )
    meta = run_identity(
        model_config=config, input_settings=dataset.input.stream_settings(), seed=seed
    )
    with Checkpoints(checkpoint_dir(str(run_dir)), save_every=1, asynchronous=False) as saver:
        saver.save(STEP, state=state, batches=dataset.batches, meta=meta)
    (run_dir / "config.gin").write_text(f"MixtureInput.vocab_path = '{dataset.input.vocab_path}'\n")
    return params


@pytest.fixture(scope="module")
def dataset(local_data) -> Dataset:
    mixture = MixtureInput(
        sources=local_sources(corpus_dir=local_data.corpus_dir),
        vocab_path=local_data.vocab_path,
        shares={"code": 0.5, "text": 0.5},
        seq_len=32,
        global_batch_size=2,
    )
    return Dataset(mixture, mixture.host_batches())


@pytest.fixture(scope="module")
def source_rows(local_data) -> dict[str, np.ndarray]:
    """128 ids of each source's held-out text, and 128 random ids (any id, special ones too)."""
    vocab = load_vocab(local_data.vocab_path)
    rows = {"random": np.random.default_rng(0).integers(0, TINY["vocab_size"], max(LENGTHS))}
    for source in SOURCES:
        docs = read_documents(corpus_dir=local_data.corpus_dir, source=source, split="validation")
        ids: list[int] = []
        for doc in docs:
            ids += vocab.encode(doc)
            if len(ids) >= max(LENGTHS):
                break
        rows[source] = np.asarray(ids[: max(LENGTHS)])
    return rows


@pytest.fixture(scope="module")
def exports(dataset, tmp_path_factory) -> dict:
    """Every case's run, params and export folder (written on first use)."""
    made: dict = {}

    def make(name: str):
        if name not in made:
            fields, _, max_shard_bytes = CASES[name]
            config = model_config(fields)
            run_dir = tmp_path_factory.mktemp(name)
            params = write_run(run_dir, config, dataset, seed=len(made))
            shards = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
            out = export_hf(run_dir=str(run_dir), out=str(run_dir / "hf"), **shards)
            made[name] = (config, params, out, run_dir)
        return made[name]

    return make


def jax_logits(config: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits = jax.jit(Transformer(config).apply)(
        {"params": params},
        jnp.asarray(tokens, jnp.int32),
        segment_ids=jnp.ones(tokens.shape, jnp.int32),
        positions=jnp.asarray(positions, jnp.int32),
    )
    return np.asarray(logits)


def load_hf(out: str):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    return model, info


@pytest.mark.parametrize("name", CASES)
def test_transformers_logits_match_the_jax_model(name, exports, source_rows):
    """transformers at each length against the JAX model's logits at the longest: the JAX model
    is causal, so its logits for a prefix are those of the prefix alone (one compile per case)."""
    config, params, out, _ = exports(name)
    model, info = load_hf(out)
    assert type(model).__name__ == CASES[name][1]
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    rows = np.stack(list(source_rows.values()))
    expected = jax_logits(config, params, rows)
    worst = {}
    for length in LENGTHS:
        with torch.no_grad():
            got = model(torch.as_tensor(rows[:, :length])).logits.numpy()
        assert got.shape == (len(rows), length, config.vocab_size)
        diffs = np.abs(got - expected[:, :length]).max(axis=(1, 2))
        worst[length] = {row: f"{diff:.1e}" for row, diff in zip(source_rows, diffs, strict=True)}
        assert diffs.max() < TOLERANCE, (length, worst[length])
    largest = float(np.abs(expected).max())
    print(f"\n{name} ({CASES[name][1]}, |logits| <= {largest:.1f}): max |diff| by length {worst}")


def test_the_tokenizer_gives_the_vocabulary_ids(exports, local_data):
    _, _, out, _ = exports("paper_a")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    vocab = load_vocab(local_data.vocab_path)
    texts = list(TOKENIZER_TEXTS)
    for source, split in itertools.product(SOURCES, ("train", "validation")):
        docs = read_documents(corpus_dir=local_data.corpus_dir, source=source, split=split)
        texts += itertools.islice(docs, 20)
    for text in texts:
        expected = [int(i) for i in vocab.encode(text)]
        assert tokenizer(text)["input_ids"] == expected, text
        assert tokenizer.encode(text) == expected, text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None
    code = TOKENIZER_TEXTS[0]
    assert tokenizer.decode(tokenizer.encode(code)) == code


def test_configs_name_the_special_ids_and_the_shards(exports):
    _, _, out, _ = exports("paper_a_gqa_untied_sharded")
    generation = transformers.GenerationConfig.from_pretrained(out, local_files_only=True)
    assert (generation.eos_token_id, generation.pad_token_id) == (1, 0)
    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    assert (config.logit_scale, config.head_dim, config.layer_norm_eps) == (1.0, 32, 1e-6)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert "tokenizer.model" in files


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"block": "parallel", "norm": "rmsnorm"}, ["norm='rmsnorm'", "block='parallel'"]),
        ({**PAPER_A, "use_bias": True}, ["CohereForCausalLM: use_bias=True"]),
        ({**PANGU, "num_kv_heads": 2}, ["GPT2LMHeadModel: num_kv_heads=2"]),
        ({**PANGU, "head_dim": 32}, ["GPT2LMHeadModel: head_dim=32"]),
        ({**LLAMA, "positions": "learned"}, ["positions='learned' (needs 'rope')"]),
        ({**PANGU, "mlp": "swiglu"}, ["mlp='swiglu' (needs 'gelu')"]),
    ],
)
def test_a_model_no_architecture_computes_is_refused_by_field(fields, named):
    with pytest.raises(UnsupportedArchitectureError) as refused:
        target_for(model_config(fields))
    for text in named:
        assert text in str(refused.value)


def test_refusals_leave_no_folder(exports, dataset, tmp_path):
    _, _, _, run_dir = exports("llama_gqa")
    out = tmp_path / "out"
    with pytest.raises(TrainedModelError, match=r"no checkpoint at step 7; it has \[3\]"):
        export_hf(run_dir=str(run_dir), out=str(out), step=7)
    assert not out.exists()

    unsupported = tmp_path / "unsupported"
    write_run(unsupported, model_config({"block": "parallel", "norm": "rmsnorm"}), dataset)
    with pytest.raises(UnsupportedArchitectureError, match="norm='rmsnorm'"):
        export_hf(run_dir=str(unsupported), out=str(out))
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        export_hf(run_dir=str(run_dir), out=str(out))
    assert os.listdir(out) == ["keep.txt"]


def recording_reads(monkeypatch, fail_at: int | None = None) -> list[list[str]]:
    """The paths of each ``SavedParams.read`` from now on; the ``fail_at``-th raises OSError."""
    reads: list[list[str]] = []
    original = SavedParams.read

    def read(self, paths):
        reads.append(list(paths))
        if len(reads) == fail_at:
            raise OSError("simulated damaged array")
        return original(self, paths)

    monkeypatch.setattr(SavedParams, "read", read)
    return reads


def test_the_export_reads_each_array_once_a_few_at_a_time(exports, tmp_path, monkeypatch):
    """Never the whole model: at most GPT-2's fused q, k and v arrays at once."""
    _, _, _, run_dir = exports("pangu")
    reads = recording_reads(monkeypatch)
    (tmp_path / "out").mkdir()  # an empty folder may be the target
    export_hf(run_dir=str(run_dir), out=str(tmp_path / "out"))
    saved = SavedParams(saved_run(str(run_dir)), STEP, model_config(CASES["pangu"][0])).paths()
    assert sorted(path for paths in reads for path in paths) == sorted(saved)
    assert max(len(paths) for paths in reads) == 3


def test_a_failed_export_leaves_nothing(exports, tmp_path, monkeypatch):
    """An array that does not read halfway through the weights: no ``out``, no partial folder."""
    _, _, _, run_dir = exports("llama_gqa")
    recording_reads(monkeypatch, fail_at=3)
    with pytest.raises(OSError, match="simulated"):
        export_hf(run_dir=str(run_dir), out=str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_a_vocabulary_trained_otherwise_is_refused(local_data):
    from sentencepiece import sentencepiece_model_pb2

    with open(local_data.vocab_path, "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = True
    with pytest.raises(UnsupportedVocabularyError, match="add_dummy_prefix=True"):
        check_settings(proto, "spm.model")


def test_a_checkpoint_sharded_over_8_devices_exports_exactly(local_data, tmp_path):
    """Paper A's variant trained 2 steps by `codemix train` on 8 devices (fsdp=4 x tensor=2, so
    its checkpoint holds every array in pieces), exported by this one-device process: the
    export's logits equal the checkpoint's JAX model's."""
    run_dir = str(tmp_path / "run")
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 2",
        "WARMUP_STEPS = 1",
        "MixtureInput.global_batch_size = 8",
        "ModelConfig.block = 'parallel'",
        "ModelConfig.norm = 'layernorm'",
        "ModelConfig.initializer_std = 0.3",
        "make_mesh.fsdp = 4",
        "make_mesh.tensor = 2",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    command = [sys.executable, "-m", "codemix_jax", "train", "--gin_file", SMOKE, *flags]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [*command, "--run_dir", run_dir], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2} of 8 cpu device(s)" in result.stderr
    out = export_hf(run_dir=run_dir, out=str(tmp_path / "hf"))
    trained = load_trained(run_dir)
    tokens = np.asarray([load_vocab(local_data.vocab_path).encode("def f(x):\n    return x")])
    model, info = load_hf(out)
    assert type(model).__name__ == "CohereForCausalLM" and not any(info.values())
    with torch.no_grad():
        got = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, jax_logits(trained.config, trained.params, tokens), atol=1e-4)
