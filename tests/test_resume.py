"""Resume and what a mixture study reads: one straight run with checkpoints at steps 4, 8 and 12,
resumed from the middle; its metrics checked against an independent computation; and the
checkpoint's guard against resuming with settings that would make it another run."""

import json
import logging
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from codemix_jax import cli
from codemix_jax.checkpoint import CheckpointMismatchError, Checkpoints
from codemix_jax.data import MixtureInput
from codemix_jax.data.sources import local_sources
from codemix_jax.model import ModelConfig, Transformer

SMOKE = "gin/experiments/smoke.gin"
NAMES = ("code", "text", "markup")
STEPS, EVERY, SEQ_LEN, BATCH = 12, 4, 64, 4
# The mixture changes at batch 4, which train step 5 consumes (step s trains on batch s - 1).
PHASES = [(0, {"code": 0.5, "text": 0.5}), (4, {"code": 0.25, "markup": 0.75})]
PEAK_LR, WARMUP, FINAL_LR = 3e-3, 2, 3e-4


def mixture(local_data, **overrides) -> MixtureInput:
    config = {
        "sources": local_sources(corpus_dir=local_data.corpus_dir),
        "vocab_path": local_data.vocab_path,
        "phases": [(0, {"code": 0.5, "text": 0.5}), (3, {"code": 0.2, "markup": 0.8})],
        "seq_len": 32,
        "global_batch_size": 8,
    }
    return MixtureInput(**{**config, **overrides})


def take(batches, count: int) -> list[dict[str, np.ndarray]]:
    return [next(batches) for _ in range(count)]


def test_resumed_input_yields_the_same_token_ids(local_data, tmp_path):
    """Save at step 4 through the real orbax checkpoint, restore into a fresh pipeline."""
    meta = {"ModelConfig": {"d_model": 8}}
    uninterrupted = take(mixture(local_data).host_batches(), 9)

    interrupted = mixture(local_data).host_batches()
    take(interrupted, 4)
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), save_every=1)
    state = {"w": jnp.arange(4.0)}
    checkpoints.save(4, state=state, batches=interrupted, meta=meta)
    take(interrupted, 2)  # The first process goes on a little before it dies.
    checkpoints.close()

    resumed = mixture(local_data).host_batches()
    restored = Checkpoints(str(tmp_path / "ckpt"), save_every=1).restore(
        4, abstract_state=state, batches=resumed, meta=meta
    )
    np.testing.assert_array_equal(restored["w"], state["w"])
    for expected, actual in zip(uninterrupted[4:], take(resumed, 5), strict=True):
        for key in ("targets", "inputs", "segment_ids", "positions", "source_id"):
            np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)


def test_checkpoint_of_another_model_is_refused(local_data, tmp_path):
    batches = mixture(local_data).host_batches()
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), save_every=1)
    state = {"w": jnp.zeros(2)}
    checkpoints.save(1, state=state, batches=batches, meta={"ModelConfig": {"d_model": 64}})
    checkpoints.close()
    with pytest.raises(CheckpointMismatchError, match=r"ModelConfig\.d_model: saved 64 vs now 128"):
        Checkpoints(str(tmp_path / "ckpt"), save_every=1).restore(
            1, abstract_state=state, batches=batches, meta={"ModelConfig": {"d_model": 128}}
        )


def train_cli(local_data, run_dir, *extra_bindings: str, num_steps: int = STEPS) -> int:
    return cli.main(train_args(local_data, run_dir, *extra_bindings, num_steps=num_steps))


def train_args(local_data, run_dir, *extra_bindings: str, num_steps: int = STEPS) -> list[str]:
    """`codemix train`'s arguments for this file's run."""
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "MixtureInput.shares = None",
        f"MixtureInput.phases = {PHASES}",
        f"NUM_STEPS = {num_steps}",
        f"PEAK_LR = {PEAK_LR}",
        f"WARMUP_STEPS = {WARMUP}",
        f"FINAL_LR = {FINAL_LR}",
        f"warmup_cosine.total_steps = {STEPS}",
        f"MixtureInput.global_batch_size = {BATCH}",
        f"MixtureInput.seq_len = {SEQ_LEN}",
        "train.log_every = 1",
        f"train.checkpoint_every = {EVERY}",
        "train.keep_checkpoints = 5",
        *extra_bindings,
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    return ["train", "--gin_file", SMOKE, "--run_dir", str(run_dir), *flags]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_copy(source_run, step: int, run_dir):
    """A fresh run dir holding only ``source_run``'s checkpoint at ``step``."""
    shutil.copytree(source_run / "checkpoints" / str(step), run_dir / "checkpoints" / str(step))
    return run_dir


@pytest.fixture(scope="module")
def straight_run(local_data, tmp_path_factory):
    """12 steps, one metrics record per step, checkpoints at 4, 8 and 12 (all kept)."""
    run_dir = tmp_path_factory.mktemp("straight")
    assert train_cli(local_data, run_dir) == 0
    return run_dir


def saved_state(run_dir, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")


def test_resume_from_a_mid_run_checkpoint_trains_only_the_remaining_steps(
    local_data, straight_run, tmp_path, caplog
):
    """Step 4's checkpoint was saved asynchronously while training went on with donated buffers;
    resuming from it must train steps 5..12 once each and end where the straight run ended."""
    run_dir = checkpoint_copy(straight_run, 4, tmp_path / "resumed")
    with caplog.at_level(logging.INFO):
        assert train_cli(local_data, run_dir) == 0
    assert "resuming from the checkpoint at step 4" in caplog.text
    assert "training steps 5..12" in caplog.text

    resumed = records(run_dir)
    assert [record["step"] for record in resumed] == list(range(5, STEPS + 1))
    straight = records(straight_run)[4:]
    for key in ("loss", "grad_norm", "loss/code", "loss/markup", "token_share/markup"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    final, expected = saved_state(run_dir, STEPS), saved_state(straight_run, STEPS)
    assert int(final["step"]) == STEPS
    for actual, wanted in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(actual, wanted)


def test_resume_after_a_crash_logs_every_step_once(local_data, straight_run, tmp_path):
    """A run that crashed after logging step 12 (and tearing its last line) but before its step-12
    checkpoint: the resume trains 9..12 again; metrics.jsonl and TensorBoard's reader see each step
    once, with the resumed run's values."""
    run_dir = tmp_path / "crashed"
    shutil.copytree(straight_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 13, "loss": 2.')
    assert train_cli(local_data, run_dir) == 0

    logged = records(run_dir)
    assert [record["step"] for record in logged] == list(range(1, STEPS + 1))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [event.step for event in losses] == list(range(1, STEPS + 1))
    assert [event.value for event in losses] == pytest.approx([r["loss"] for r in logged])


def cosine_lr(count: int) -> float:
    """The schedule written out from its definition: linear warmup from 0, then cosine."""
    if count < WARMUP:
        return PEAK_LR * count / WARMUP
    progress = (count - WARMUP) / (STEPS - WARMUP)
    return FINAL_LR + (PEAK_LR - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def source_losses(run_dir, step: int, batch: dict) -> dict[str, float]:
    """Mean next-token loss per source of ``batch`` under the params saved at ``step``."""
    meta = json.loads((run_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    config = ModelConfig(**meta["ModelConfig"])
    logits = Transformer(config).apply(
        {"params": saved_state(run_dir, step)["params"]},
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_loss = -np.take_along_axis(np.asarray(log_probs), batch["targets"][..., None], -1)
    row_loss = token_loss[..., 0].mean(axis=1)  # every row is full: seq_len real tokens
    return {
        f"loss/{name}": float(row_loss[batch["source_id"] == index].mean())
        for index, name in enumerate(NAMES)
        if (batch["source_id"] == index).any()
    }


def test_study_metrics_match_an_independent_computation(local_data, straight_run):
    """loss/<source>, token_share/<source>, learning_rate and mixture_phase at every step,
    including the first step of the second phase (step 5, which trains on batch 4)."""
    logged = records(straight_run)
    assert [record["step"] for record in logged] == list(range(1, STEPS + 1))
    replay = MixtureInput(
        sources=local_sources(corpus_dir=local_data.corpus_dir),
        vocab_path=local_data.vocab_path,
        phases=PHASES,
        seq_len=SEQ_LEN,
        global_batch_size=BATCH,
    ).host_batches()
    for record, batch in zip(logged, replay, strict=False):
        step = record["step"]
        rows = np.bincount(batch["source_id"], minlength=len(NAMES))
        for index, name in enumerate(NAMES):
            assert record[f"token_share/{name}"] == rows[index] / BATCH, (step, name)
            assert (f"loss/{name}" in record) == bool(rows[index]), (step, name)
        assert record["mixture_phase"] == (0 if step <= 4 else 1)
        assert record["learning_rate"] == pytest.approx(cosine_lr(step - 1), rel=1e-6, abs=1e-12)
        if step - 1 in (4, 8):  # Steps 5 and 9 start from the checkpoints at 4 and 8.
            expected = source_losses(straight_run, step - 1, batch)
            assert {k: record[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert logged[4]["token_share/markup"] == 0.75 and logged[3]["token_share/markup"] == 0.0


@pytest.mark.parametrize(
    ("binding", "named"),
    [
        ("MixtureInput.seq_len = 32", "MixtureInput.seq_len: saved 64 vs now 32"),
        ("MixtureInput.global_batch_size = 8", "MixtureInput.global_batch_size: saved 4 vs now 8"),
        ("MixtureInput.phases = [(0, {'code': 0.5, 'text': 0.5})]", "MixtureInput.phases"),
        ("MixtureInput.seed = 1", "MixtureInput.seed: saved 0 vs now 1"),
        ("train.seed = 1", "train.seed: saved 0 vs now 1"),
        ("ModelConfig.d_ff = 128", "ModelConfig.d_ff: saved 256 vs now 128"),
    ],
    ids=["seq_len", "batch", "phases", "data_seed", "init_seed", "model"],
)
def test_resume_with_settings_of_another_run_is_refused_by_name(
    local_data, straight_run, tmp_path, caplog, binding, named
):
    run_dir = checkpoint_copy(straight_run, STEPS, tmp_path / "run")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with caplog.at_level(logging.ERROR):
        assert train_cli(local_data, run_dir, binding, num_steps=STEPS + 2) == 2
    assert named in caplog.text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert not (run_dir / "metrics.jsonl").exists()


def test_resume_may_extend_the_run_and_change_how_it_runs(local_data, straight_run, tmp_path):
    """More steps, another schedule length, log interval, input threads, remat: all legitimate."""
    run_dir = checkpoint_copy(straight_run, STEPS, tmp_path / "run")
    changes = [
        f"warmup_cosine.total_steps = {STEPS + 2}",
        "train.log_every = 2",
        "MixtureInput.num_threads = 1",
        "ModelConfig.remat = True",
    ]
    assert train_cli(local_data, run_dir, *changes, num_steps=STEPS + 2) == 0
    assert [record["step"] for record in records(run_dir)] == [STEPS + 2]
