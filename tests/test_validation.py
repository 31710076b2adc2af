"""Per-source validation: losses against a plain numpy reference, bytes against UTF-8, the same
figures on 8-device meshes, what a training run writes (at the configured steps, once across a
resume), and the evaluation's time kept out of the throughput. (The same figures from two
processes as from one device: test_multihost, on its shared two-process run.)"""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from codemix_jax import cli, optim, sharding
from codemix_jax.data import MixtureInput, load_vocab, local_sources
from codemix_jax.data.corpus import SOURCES, read_documents
from codemix_jax.data.sources import local_instruction_sources
from codemix_jax.eval.validation import Validation, Validator, token_bytes
from codemix_jax.metrics import IntervalLogger, MetricsWriter, Throughput
from codemix_jax.model import ModelConfig, Transformer
from codemix_jax.train_state import build_train_program, init_train_state

# A wide initialisation makes per-token losses differ a lot, so a wrongly weighted token shows.
CONFIG = ModelConfig(
    vocab_size=2048, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=64,
    initializer_std=0.3,
)  # fmt: skip
SEQ_LEN, ROWS, BATCH = 64, 5, 8  # up to 5 rows per source (the test corpus's code has 2)
NAMES = ("code", "text", "markup", "code_it")
SCRIPT = os.path.join(os.path.dirname(__file__), "validation_mesh.py")


def run_sources(corpus_dir: str, instructions_dir: str):
    """The corpus's three sources and the code instruction set, which the mixture never reads."""
    instructions = local_instruction_sources(instructions_dir=instructions_dir)
    code_it = next(source for source in instructions if source.name == "code")
    return [*local_sources(corpus_dir=corpus_dir), dataclasses.replace(code_it, name="code_it")]


def measure(sources, vocab_path: str, mesh: jax.sharding.Mesh, **settings):
    """(validator, params on the host, its scalars) for a fresh seed-0 model on ``mesh``."""
    gin.clear_config()  # token_losses' default (full logits), whatever earlier tests bound
    dataset = MixtureInput(
        sources=sources,
        vocab_path=vocab_path,
        shares={"code": 0.5, "text": 0.5},
        seq_len=SEQ_LEN,
        global_batch_size=BATCH,
    )
    rules = sharding.logical_axis_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = build_train_program(
            model_config=CONFIG,
            dataset=dataset,
            mesh=mesh,
            rules=rules,
            learning_rate=optax.constant_schedule(0.0),
            optimizer=optim.adamw,
        )
        validator = Validator(Validation(**settings), program=program, dataset=dataset)
        state = init_train_state(
            model=program.model, tx=program.tx, shardings=program.shardings, seed=0
        )
        return validator, jax.device_get(state.params), validator.run(0, state.params)


@pytest.fixture(scope="module")
def measured(local_data, local_instructions):
    sources = run_sources(local_data.corpus_dir, local_instructions)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    return measure(sources, local_data.vocab_path, mesh, rows=ROWS, batch_size=BATCH)


def reference_nats(params, rows: dict[str, np.ndarray]) -> tuple[float, float]:
    """Summed cross entropy (nats) and weight of the scored targets, in float64 numpy."""
    logits = Transformer(CONFIG).apply(
        {"params": params},
        rows["inputs"],
        segment_ids=rows["segment_ids"],
        positions=rows["positions"],
    )
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_normalizer = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    target_logit = np.take_along_axis(logits, rows["targets"][..., None], axis=-1)[..., 0]
    weights = (rows["segment_ids"] > 0) * rows["loss_weights"]
    return float(((log_normalizer - target_logit) * weights).sum()), float(weights.sum())


def scored_text_bytes(rows: dict[str, np.ndarray], vocab_path: str) -> int:
    """UTF-8 bytes of the scored targets' text, decoded by SentencePiece (EOS decodes to '')."""
    scored = (rows["segment_ids"] > 0) & (rows["loss_weights"] > 0)
    return len(load_vocab(vocab_path).tokenizer.decode(rows["targets"][scored].tolist()).encode())


def test_losses_and_bits_per_byte_match_a_plain_reference(measured, local_data):
    """Every source, the zero-share markup and instruction set too; the instruction rows' prompts
    weigh nothing; the padding rows that fill the last batch add nothing."""
    validator, params, scalars = measured
    counts = [len(rows["targets"]) for rows in validator.rows.values()]
    assert list(validator.rows) == list(NAMES) and all(0 < count <= ROWS for count in counts)
    assert sum(counts) % BATCH  # a batch with padding rows
    assert 0 < validator.rows["code_it"]["loss_weights"].mean() < 1  # prompts are left out
    totals = np.zeros(3)  # nats, tokens, bytes over all sources
    for name, rows in validator.rows.items():
        nats, tokens = reference_nats(params, rows)
        num_bytes = scored_text_bytes(rows, local_data.vocab_path)
        assert scalars[f"val/{name}/loss"] == pytest.approx(nats / tokens, rel=1e-5), name
        assert scalars[f"val/{name}/bpb"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
        totals += [nats, tokens, num_bytes]
    nats, tokens, num_bytes = totals
    assert scalars["val/loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert scalars["val/bpb"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
    assert len(scalars) == 2 * len(NAMES) + 2


def test_the_rows_are_the_split_s_first_and_the_same_every_time(
    measured, local_data, local_instructions
):
    """Read once per validator, the same in a new one: code's first row opens its first document."""
    validator, _, scalars = measured
    again, _, rescored = measure(
        run_sources(local_data.corpus_dir, local_instructions),
        local_data.vocab_path,
        sharding.make_mesh(devices=jax.devices()[:1]),
        rows=ROWS,
        batch_size=BATCH,
    )
    for name in NAMES:
        for feature, values in validator.rows[name].items():
            np.testing.assert_array_equal(again.rows[name][feature], values, err_msg=name)
    assert rescored == scalars
    first = validator.rows["code"]
    opening = first["targets"][0][(first["segment_ids"][0] == 1) & (first["targets"][0] > 1)]
    text = load_vocab(local_data.vocab_path).tokenizer.decode(opening.tolist())
    document = next(
        read_documents(corpus_dir=local_data.corpus_dir, source="code", split="validation")
    )
    assert len(text) > 50 and document.startswith(text)


def test_token_bytes_add_up_to_the_utf8_length_of_real_documents(local_data):
    """Every validation document and 20 training ones per source, and a string that needs the
    byte fallback; EOS and padding are no bytes."""
    vocab = load_vocab(local_data.vocab_path)
    table = token_bytes(local_data.vocab_path)
    fallback = "naïve café ☃ 🦀 中文 \t\x00 ∑"
    documents = [fallback]
    for source in SOURCES:
        documents += read_documents(
            corpus_dir=local_data.corpus_dir, source=source, split="validation"
        )
        train = read_documents(corpus_dir=local_data.corpus_dir, source=source, split="train")
        documents += [next(train) for _ in range(20)]
    for document in documents:
        ids = vocab.encode(document)
        assert table[ids].sum() == len(document.encode()), document[:80]
    assert any(vocab.tokenizer.is_byte(i) for i in vocab.encode(fallback))
    assert table[vocab.eos_id] == 0 and table[0] == 0


def test_a_source_without_a_validation_split_is_skipped_by_name(local_data, caplog):
    sources = local_sources(corpus_dir=local_data.corpus_dir)
    sources[2] = dataclasses.replace(sources[2], validation=None)
    with caplog.at_level(logging.WARNING):
        _, _, scalars = measure(
            sources,
            local_data.vocab_path,
            sharding.make_mesh(devices=jax.devices()[:1]),
            rows=1,
            batch_size=BATCH,
        )
    assert "validation: no validation split, not measured: markup" in caplog.text
    assert sorted(scalars) == sorted(
        f"val/{n}{m}" for n in ("code/", "text/", "") for m in ("loss", "bpb")
    )


def test_the_same_numbers_on_8_device_meshes(measured, local_data, local_instructions):
    """data 2 x fsdp 4 and data 2 x fsdp 2 x tensor 2 give the 1-device figures; a batch that
    does not divide data x fsdp is refused by name."""
    args = [local_data.corpus_dir, local_data.vocab_path, local_instructions]
    result = subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    meshes, refusal = json.loads(line.removeprefix("RESULT "))
    _, _, one_device = measured
    for scalars in meshes:
        assert scalars == pytest.approx(one_device, rel=1e-6)
    assert refusal == (
        "Validation.batch_size=4 must be a multiple of the data x fsdp mesh size 8 "
        "and of the process count 1"
    )


@pytest.mark.parametrize("setting", ["every", "rows", "batch_size"])
def test_a_bad_setting_is_refused_by_name(setting):
    with pytest.raises(ValueError, match=f"Validation.{setting} must be >= 1, got 0"):
        Validation(**{setting: 0})


def train_args(local_data, run_dir, *bindings: str) -> list[str]:
    """Six smoke steps: records at 1, 3, 6 (log_every) and 2, 4, 6 (validation)."""
    bindings = (
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 6",
        "WARMUP_STEPS = 1",
        "MixtureInput.seq_len = 32",
        "MixtureInput.global_batch_size = 4",
        "train.log_every = 3",
        "train.checkpoint_every = 2",
        "train.keep_checkpoints = 5",
        "Validation.every = 2",
        "Validation.rows = 3",
        *bindings,
    )
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    return ["train", "--gin_file", "gin/experiments/smoke.gin", "--run_dir", str(run_dir), *flags]


def val_records(run_dir) -> tuple[list[int], dict[int, dict]]:
    """All records' steps, and the validation scalars by step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")} for r in records}
    return [r["step"] for r in records], {step: v for step, v in val.items() if v}


def tensorboard_steps(run_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def straight_run(local_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    assert cli.main(train_args(local_data, run_dir)) == 0
    return run_dir


def test_a_run_writes_validation_at_the_configured_steps_once_across_a_resume(
    local_data, straight_run, tmp_path
):
    steps, val = val_records(straight_run)
    assert steps == [1, 2, 3, 4, 6]
    assert sorted(val) == [2, 4, 6]
    assert all(len(scalars) == 8 for scalars in val.values())  # 3 sources and all, loss and bpb
    assert [step for step, _ in tensorboard_steps(straight_run, "val/text/bpb")] == [2, 4, 6]

    resumed = tmp_path / "resumed"  # crashed after logging step 6, before its checkpoint
    shutil.copytree(straight_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    assert cli.main(train_args(local_data, resumed)) == 0
    assert val_records(resumed) == (steps, val)
    code_loss = tensorboard_steps(straight_run, "val/code/loss")
    assert tensorboard_steps(resumed, "val/code/loss") == code_loss


def test_a_bad_setting_stops_the_run_before_it_writes(local_data, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli.main(train_args(local_data, tmp_path, "Validation.every = 0")) == 2
    assert "Validation.every must be >= 1, got 0" in caplog.text
    assert not (tmp_path / "metrics.jsonl").exists()


class SlowEvaluation:
    """Due at step 3 only, and takes half a second."""

    def due(self, step: int) -> bool:
        return step == 3

    def run(self, step: int, params) -> dict[str, float]:
        time.sleep(0.5)
        return {"val/loss": 1.0}


def test_an_evaluation_gets_its_step_a_record_and_stays_out_of_the_throughput(tmp_path):
    one = np.ones((), np.float32)
    metrics = {
        "loss_sum": one, "loss_tokens": one, "grad_norm": one, "steps": one,
        "source_loss_sum": one[None], "source_loss_tokens": one[None], "source_tokens": one[None],
    }  # fmt: skip
    with MetricsWriter(str(tmp_path), resume_step=0) as writer:
        logger = IntervalLogger(
            writer=writer,
            throughput=Throughput(tokens_per_step=1, flops_per_token=1.0, num_devices=1),
            source_names=["code"],
            learning_rate=lambda step: 0.0,
            phase_at=lambda step: 0,
            first_step=1,
            num_steps=4,
            log_every=2,
            evaluation=SlowEvaluation(),
        )
        logged = {step: logger.add(step, metrics) for step in range(1, 5)}
    assert [step for step, scalars in logged.items() if scalars] == [1, 2, 3, 4]
    assert logged[3]["val/loss"] == 1.0 and "val/loss" not in logged[4]
    assert logged[3]["step_time_s"] < 0.25 and logged[4]["step_time_s"] < 0.25
