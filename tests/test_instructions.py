"""Instruction tuning as a stage: (prompt, response) sources whose loss is on response tokens only,
checked token by token against the raw records, through ingest, the mixture, the train step and
`codemix train`; bad instruction files are refused by file, line and field before anything is
written."""

import ast
import functools
import json
import logging
import math
import sysconfig
from pathlib import Path
from pydoc_data import topics

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from flax import linen as nn

from codemix_jax import cli, gin_config, optim, sharding
from codemix_jax.data import MixtureInput, load_vocab, pack_rows
from codemix_jax.data.ingest import ingest
from codemix_jax.data.instructions import InstructionFields
from codemix_jax.data.sources import Source, local_instruction_sources
from codemix_jax.model import ModelConfig, Transformer
from codemix_jax.train_state import global_batch, init_train_state, make_train_step, state_layout

EOS = 1
FIT_STEPS = 5
SMOKE_IT = "gin/experiments/smoke_instruction_tuning.gin"
LOCAL_IT = "gin/data/sources/local_instructions.gin"
SCHEDULES = "gin/data/mixture_schedules"
TINY = ModelConfig(vocab_size=2048, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_seq_len=128)


@pytest.fixture(autouse=True)
def no_gin_bindings():
    """Some tests parse gin files; their bindings must not reach another test's configurables."""
    gin.clear_config()
    yield
    gin.clear_config()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def expected_rows(records: list[dict], vocab, seq_len: int) -> dict[str, np.ndarray]:
    """The rows packing must make of ``records``, computed here from the raw texts: prompt ids,
    response ids, EOS; weight 1 on response and EOS; a segment per example and per row start."""
    tokens, weights, starts = [], [], []
    for record in records:
        prompt, response = vocab.encode(record["prompt"]), vocab.encode(record["response"])
        tokens += [*prompt, *response, EOS]
        weights += [0] * len(prompt) + [1] * (len(response) + 1)
        starts += [1] + [0] * (len(prompt) + len(response))
    end = len(tokens) // seq_len * seq_len
    tokens, weights, starts = (
        np.array(x[:end]).reshape(-1, seq_len) for x in (tokens, weights, starts)
    )
    starts[:, 0] = 1
    segment_ids = np.cumsum(starts, axis=1)
    positions = np.zeros_like(tokens)
    for row, col in np.ndindex(tokens.shape):
        positions[row, col] = 0 if starts[row, col] else positions[row, col - 1] + 1
    inputs = np.where(positions == 0, 0, np.roll(tokens, 1, axis=1))
    return {
        "targets": tokens,
        "loss_weights": weights,
        "segment_ids": segment_ids,
        "positions": positions,
        "inputs": inputs,
    }


def task_rows(source: Source, vocab_path: str, seq_len: int) -> dict[str, np.ndarray]:
    """Every full row of the source's train split, in file order, stacked per feature."""
    dataset = source.task(vocab_path=vocab_path).get_dataset(
        sequence_length={"targets": seq_len}, split="train", shuffle=False, num_epochs=1
    )
    rows = list(dataset.as_numpy_iterator())
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def test_pack_rows_keeps_aligned_weights_on_their_tokens():
    examples = [
        ([5, 6, 7], [0, 1, 1]),
        ([8, 9], [0, 1]),
        ([10, 11, 12, 13, 14, 15], [0, 0, 0, 1, 1, 1]),
    ]
    dataset = tf.data.Dataset.from_generator(
        lambda: ({"targets": t, "loss_weights": w} for t, w in examples),
        output_signature={
            "targets": tf.TensorSpec([None], tf.int32),
            "loss_weights": tf.TensorSpec([None], tf.int32),
        },
    )
    rows = [
        {key: value.tolist() for key, value in row.items()}
        for row in pack_rows(dataset, seq_len=4, aligned=("loss_weights",)).as_numpy_iterator()
    ]
    assert rows == [
        {"targets": [5, 6, 7, 8], "loss_weights": [0, 1, 1, 0], "segment_ids": [1, 1, 1, 2],
         "positions": [0, 1, 2, 0], "inputs": [0, 5, 6, 0]},
        {"targets": [9, 10, 11, 12], "loss_weights": [1, 0, 0, 0], "segment_ids": [1, 2, 2, 2],
         "positions": [0, 0, 1, 2], "inputs": [0, 0, 10, 11]},
    ]  # fmt: skip
    misaligned = tf.data.Dataset.from_tensors({"targets": [5, 6, 7], "loss_weights": [1, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError, match="loss_weights per targets id"):
        list(pack_rows(misaligned, seq_len=2, aligned=("loss_weights",)))


@pytest.fixture(scope="module")
def raw_records(local_instructions) -> list[dict]:
    """The first 30 examples of each local set, interleaved, as raw JSONL records."""
    text, code = (
        read_jsonl(f"{local_instructions}/{name}.jsonl")[:30] for name in ("text", "code")
    )
    return [record for pair in zip(text, code, strict=True) for record in pair]


@pytest.mark.parametrize("pretokenized", [False, True], ids=["text_shards", "pretokenized"])
def test_mask_is_exactly_each_examples_response_and_eos(
    local_data, raw_records, tmp_path, pretokenized
):
    """Packed rows, token by token, equal the raw records' prompt + response + EOS with weight 1
    on response and EOS only; rows hold several examples and examples span rows."""
    seq_len = 96
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", raw_records)
    vocab_path = local_data.vocab_path if pretokenized else None
    ingest(
        inputs=[str(jsonl)],
        out_dir=str(tmp_path / "shards"),
        instruction=InstructionFields(),
        vocab_path=vocab_path,
        validation_fraction=0.0,
        workers=1,
    )
    source = Source(
        name="mixed",
        category="text",
        kind="instruction",
        train=str(tmp_path / "shards" / "train-*.tfrecord"),
        pretokenized=pretokenized,
    )
    rows = task_rows(source, local_data.vocab_path, seq_len)
    expected = expected_rows(raw_records, load_vocab(local_data.vocab_path), seq_len)
    assert set(rows) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(rows[key], value, err_msg=key)
    segments_per_row = rows["segment_ids"].max(axis=1)
    assert segments_per_row.max() >= 3  # rows holding several examples
    continued = rows["loss_weights"][:, 0] == 1  # a row opening inside a response
    assert continued.any() and (rows["loss_weights"] == 0).any()


def it_mixture(local_data, local_instructions, **overrides) -> MixtureInput:
    config = {
        "sources": local_instruction_sources(instructions_dir=local_instructions),
        "vocab_path": local_data.vocab_path,
        "shares": {"text": 0.5, "code": 0.5},
        "seq_len": 128,
        "global_batch_size": 8,
    }
    return MixtureInput(**{**config, **overrides})


def train_step_metrics(batches: list[dict]) -> tuple[dict, list[dict]]:
    """(params, the real train step's metric sums for each batch from those params): the params
    are fitted to ``batches[0]`` for a few steps first, so their logits are far from uniform."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rules = sharding.logical_axis_rules()
    tx = optim.adamw(optax.constant_schedule(1e-2))
    model = Transformer(TINY)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings = state_layout(model=model, tx=tx, mesh=mesh, rules=rules)
        state = init_train_state(model=model, tx=tx, shardings=shardings, seed=0)
        step = make_train_step(
            model=model, tx=tx, num_sources=2, state_shardings=shardings, mesh=mesh
        )
        for _ in range(FIT_STEPS):
            state, _ = step(state, global_batch(batches[0], mesh))
        params = jax.device_get(state.params)
        copy = functools.partial(jax.tree.map, jnp.copy)  # the step donates the state it is given
        metrics = [jax.device_get(step(copy(state), global_batch(b, mesh))[1]) for b in batches]
    return params, metrics


def token_cross_entropy(params, config: ModelConfig, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[b, l] next-token cross entropy, computed here with numpy from the model's logits."""
    logits = Transformer(config).apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    return -np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]


def masked_mean_loss(params, batch: dict[str, np.ndarray]) -> jax.Array:
    """The mean cross entropy over response tokens, written here for its gradient."""
    logits = Transformer(TINY).apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (losses * batch["loss_weights"]).sum() / batch["loss_weights"].sum()


def perturbed_targets(batch: dict, where: np.ndarray, seed: int) -> dict:
    """``batch`` with other targets at ``where``: those tokens' losses change, no logit does."""
    targets = batch["targets"].copy()
    targets[where] = np.random.default_rng(seed).integers(3, TINY.vocab_size, where.sum())
    return {**batch, "targets": targets}


def test_train_step_loss_is_the_mean_over_response_tokens(local_data, local_instructions):
    """The step's loss and per-source sums are the response-only masked mean computed by hand;
    changing prompt targets leaves the loss alone, changing response targets moves it."""
    batch = next(it_mixture(local_data, local_instructions).host_batches())
    weights = batch["loss_weights"]
    assert 0 < weights.mean() < 1  # prompts and responses both present
    prompt_changed = perturbed_targets(batch, weights == 0, seed=1)
    response_changed = perturbed_targets(batch, weights == 1, seed=2)
    params, (metrics, *perturbed) = train_step_metrics([batch, prompt_changed, response_changed])

    losses = token_cross_entropy(params, TINY, batch)
    expected = (losses * weights).sum() / weights.sum()
    assert metrics["loss_sum"] / metrics["loss_tokens"] == pytest.approx(expected, rel=1e-5)
    assert metrics["loss_tokens"] == weights.sum()
    for source in range(2):
        rows = batch["source_id"] == source
        np.testing.assert_allclose(
            metrics["source_loss_sum"][source], (losses * weights)[rows].sum(), rtol=1e-5
        )
        assert metrics["source_loss_tokens"][source] == weights[rows].sum()
        assert metrics["source_tokens"][source] == rows.sum() * 128  # all tokens: the shares
    assert abs(losses.mean() - expected) > 1e-3  # an all-token mean would not pass the above
    # The update is this mean's gradient: not a sum, nor a mean over all tokens.
    expected_norm = float(optax.tree.norm(jax.grad(masked_mean_loss)(params, batch)))
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)

    prompt_loss, response_loss = (m["loss_sum"] / m["loss_tokens"] for m in perturbed)
    assert prompt_loss == pytest.approx(expected, rel=1e-6)
    assert abs(response_loss - expected) > 1e-3


@pytest.mark.parametrize(
    ("schedule", "text_rows"),
    [
        ("paper_b_uniform", [5, 5, 5, 5]),
        ("paper_b_stepwise_increase", [7, 7, 6, 5]),
        ("paper_b_stepwise_decrease", [5, 6, 7, 7]),
    ],
)
def test_paper_b_schedules_give_exact_rows_of_instruction_sources(
    local_data, local_instructions, schedule, text_rows
):
    """Paper B's text:code ratios per phase (5:3 uniform; 7:3, 7:3, 6:4, 5:5; 5:5, 6:4, 7:3, 7:3),
    as the gin schedules set them, are exact rows of every batch of the local instruction sets."""
    batch_size = 8 if schedule == "paper_b_uniform" else 10
    gin_config.parse(
        [LOCAL_IT, f"{SCHEDULES}/{schedule}.gin"],
        [
            f"local_instruction_sources.instructions_dir = '{local_instructions}'",
            f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
            "NUM_STEPS = 8",  # four equal phases of 2 steps
            "MixtureInput.seq_len = 64",
            f"MixtureInput.global_batch_size = {batch_size}",
        ],
    )
    config = MixtureInput()
    assert config.source_names == ("text", "code")
    batches = config.host_batches()
    for step in range(8):
        batch = next(batches)
        counts = np.bincount(batch["source_id"], minlength=2).tolist()
        assert counts == [text_rows[step // 2], batch_size - text_rows[step // 2]], (schedule, step)
        assert ((batch["loss_weights"] == 0) | (batch["loss_weights"] == 1)).all()


ALPACA = [
    {"instruction": "Name a prime number.", "input": "", "output": "Seven."},
    {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"},
    {
        "instruction": "Write a haiku.",
        "input": "about tf.data",
        "output": "Tensors flow\nlike rain",
    },
]


def run_ingest(args: list[str]) -> int:
    return cli.main(["ingest", "--workers", "1", "--validation_fraction", "0", *args])


def test_ingest_maps_alpaca_fields_and_keeps_the_mask(local_data, tmp_path):
    """`codemix ingest --instruction` on Alpaca's layout: prompt = instruction + input (when not
    empty), ids per part; the pretokenized shards give the rows the raw records give."""
    jsonl = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4)
    flags = ["--instruction", "--prompt_fields", "instruction,input", "--response_field", "output"]
    out_dir = tmp_path / "shards"
    args = ["--input", str(jsonl), "--out_dir", str(out_dir), "--vocab_path", local_data.vocab_path]
    assert run_ingest([*args, *flags]) == 0

    vocab = load_vocab(local_data.vocab_path)
    pairs = [
        {
            "prompt": "\n\n".join(p for p in (r["instruction"], r["input"]) if p),
            "response": r["output"],
        }
        for r in ALPACA * 4
    ]
    assert pairs[0]["prompt"] == "Name a prime number."
    assert pairs[1]["prompt"] == "Reverse the list.\n\n[1, 2, 3]"
    stored = []
    for record in tf.data.TFRecordDataset(sorted(map(str, out_dir.glob("train-*.tfrecord")))):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        stored.append({name: feature[name] for name in feature})
    assert len(stored) == len(pairs)
    for example, pair in zip(stored, pairs, strict=True):
        assert example["prompt"].bytes_list.value[0].decode() == pair["prompt"]
        assert example["response"].bytes_list.value[0].decode() == pair["response"]
        assert list(example["prompt_ids"].int64_list.value) == vocab.encode(pair["prompt"])
        assert list(example["response_ids"].int64_list.value) == vocab.encode(pair["response"])

    source = Source(
        name="alpaca",
        category="text",
        kind="instruction",
        train=str(out_dir / "train-*.tfrecord"),
        pretokenized=True,
    )
    rows = task_rows(source, local_data.vocab_path, 16)
    for key, value in expected_rows(pairs, vocab, 16).items():
        np.testing.assert_array_equal(rows[key], value, err_msg=key)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


GOOD = {"prompt": "Say hi.", "response": "Hi."}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "Say hi."}, "line 3: field 'response' is missing"),
        (
            {"prompt": "Say hi.", "response": "  \n"},
            "line 3: field 'response' (the response) is empty",
        ),
        ({"response": "Hi."}, "line 3: field 'prompt' is missing"),
        ({"prompt": "", "response": "Hi."}, "line 3: field(s) ['prompt'] empty"),
        (
            {"prompt": "Say hi.", "response": 7},
            "line 3: field 'response' must be a string, got int",
        ),
        ("{not json", "line 3: invalid json"),
    ],
    ids=["no_response", "empty_response", "no_prompt", "empty_prompt", "not_a_string", "bad_json"],
)
def test_bad_instruction_record_is_named_before_anything_is_written(
    local_data, tmp_path, caplog, bad, message
):
    """The first of two inputs is good, the second bad at line 3: the error names the file, line
    and field; a fresh out_dir is not created, a previous ingest's out_dir is left as it was."""
    good = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 4)
    path = tmp_path / "b.jsonl"
    lines = [json.dumps(GOOD)] * 2 + [bad if isinstance(bad, str) else json.dumps(bad)] + ["{}"]
    path.write_text("\n".join(lines) + "\n")
    previous = tmp_path / "previous"
    assert run_ingest(["--input", str(good), "--out_dir", str(previous), "--instruction"]) == 0
    before = snapshot(previous)
    assert any(name.endswith(".tfrecord") for name in before)

    for out_dir in (tmp_path / "fresh", previous):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            args = ["--input", str(tmp_path / "*.jsonl"), "--out_dir", str(out_dir)]
            assert run_ingest([*args, "--instruction"]) == 2
        assert f"{path}, {message}" in caplog.text
    assert not (tmp_path / "fresh").exists()
    assert snapshot(previous) == before


def test_instruction_field_flags_need_instruction(tmp_path, caplog):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with caplog.at_level(logging.ERROR):
        args = ["--input", str(jsonl), "--out_dir", str(tmp_path / "out"), "--response_field", "x"]
        assert run_ingest(args) == 2
    assert "--prompt_fields and --response_field need --instruction" in caplog.text
    assert not (tmp_path / "out").exists()


def test_instruction_source_settings_are_checked():
    with pytest.raises(ValueError, match="unknown kind 'chat'"):
        Source(name="x", category="text", train="x-*", kind="chat")
    with pytest.raises(ValueError, match="codemix ingest --instruction"):
        Source(name="x", category="text", train="alpaca:1.0.0", format="tfds", kind="instruction")
    missing = Source(name="x", category="text", train="/no/such/*.tfrecord", kind="instruction")
    with pytest.raises(FileNotFoundError, match="codemix build-instructions"):
        missing.require_files("train")


def test_paper_b_instruction_sources_parse():
    gin_config.parse(
        ["gin/data/sources/paper_b_instructions.gin", f"{SCHEDULES}/paper_b_uniform.gin"],
        ["NUM_STEPS = 4000"],  # the run's length, which the four phases divide
    )
    config = MixtureInput(seq_len=1024, global_batch_size=512)
    assert config.source_names == ("text", "code")
    assert all(s.kind == "instruction" and s.pretokenized for s in config.sources)
    assert config.schedule[0][1] == {"text": 0.625, "code": 0.375}


def test_local_sets_are_the_installs_own_text(local_instructions):
    """Code examples are whole stdlib functions, cut after the docstring: head in the prompt, the
    rest of the function, exactly, as the response. Text titles are headings of their topic."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = read_jsonl(f"{local_instructions}/code.jsonl")
    assert len(code) == 150
    for record in code[:20]:
        module, name = record["id"].removeprefix("code:").rsplit(".", 1)
        path = stdlib / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = stdlib / module.replace(".", "/") / "__init__.py"
        source = path.read_text()
        function = next(
            node
            for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        )
        head = record["prompt"].split("\n\n", 1)[1]
        assert head.endswith('"""\n') or head.endswith("'\n"), record["id"]  # the docstring's end
        whole = (head + record["response"]).rstrip("\n")
        assert whole.endswith(ast.get_source_segment(source, function)), record["id"]
        assert whole in source and record["response"].strip(), record["id"]
    text = read_jsonl(f"{local_instructions}/text.jsonl")
    assert len(text) == 150
    titles = [r for r in text if r["id"].endswith(":title")]
    assert titles
    for record in titles:
        topic = topics.topics[record["id"].removeprefix("text:").split("#")[0]]
        assert f"\n{record['response']}\n" in f"\n{topic}", record["id"]


def test_instruction_tuning_run_reports_the_response_only_loss(
    local_data, local_instructions, tmp_path
):
    """The smoke IT experiment for 4 steps (one per phase): step 3's logged loss and per-source
    losses are the response-only means of batch 2 under the params saved at step 2; shares count
    all tokens."""
    run_dir = tmp_path / "run"
    bindings = [
        f"local_instruction_sources.instructions_dir = '{local_instructions}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 4",
        "WARMUP_STEPS = 1",
        "ModelConfig.max_seq_len = 128",
        "MixtureInput.seq_len = 128",
        "train.log_every = 1",
        "train.checkpoint_every = 2",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    assert cli.main(["train", "--gin_file", SMOKE_IT, "--run_dir", str(run_dir), *flags]) == 0
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    record = records[2]

    gin_config.parse([SMOKE_IT], bindings)
    config, dataset = ModelConfig(), MixtureInput()
    gin.clear_config()
    batches = dataset.host_batches()
    batch = [next(batches) for _ in range(3)][2]
    params = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "2" / "state")["params"]
    losses = token_cross_entropy(params, config, batch)
    weights = batch["loss_weights"]
    assert record["loss"] == pytest.approx((losses * weights).sum() / weights.sum(), rel=1e-5)
    # Weighing every token instead is measurably another number (by 7.5e-4 relative with the
    # packages installed on 2026-12-06: the markup source, and so the vocabulary, is built from
    # the installed packages' READMEs); the weighted loss above agrees to 1e-5.
    assert not math.isclose(record["loss"], losses.mean(), rel_tol=1e-4)
    for index, name in enumerate(dataset.source_names):
        rows = batch["source_id"] == index
        expected = (losses * weights)[rows].sum() / weights[rows].sum()
        assert record[f"loss/{name}"] == pytest.approx(expected, rel=1e-5), name
        assert record[f"token_share/{name}"] == rows.sum() / len(rows), name
