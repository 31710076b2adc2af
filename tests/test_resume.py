"""Deterministic, resumable input: an interrupted run resumes with exactly the same batches."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from codemix_jax import cli
from codemix_jax.checkpoint import CheckpointMismatchError, Checkpoints
from codemix_jax.data import MixtureInput
from codemix_jax.data.sources import local_sources

SMOKE = "gin/experiments/smoke.gin"


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
    meta = {"model_config": {"d_model": 8}}
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


def test_phases_switch_the_mixture_at_their_step(local_data):
    batches = take(mixture(local_data).host_batches(), 6)
    names = ("code", "text", "markup")
    before = {names[i] for b in batches[:3] for i in b["source_id"]}
    after = {names[i] for b in batches[3:] for i in b["source_id"]}
    assert before == {"code", "text"}
    assert after == {"code", "markup"}
    # Exact per-batch allocation: 8 rows at 0.2/0.8 over 3 batches = 4.8 -> 5 and 19.2 -> 19 rows.
    code_rows = sum(int((b["source_id"] == 0).sum()) for b in batches[3:])
    assert code_rows == 5


def test_checkpoint_of_another_model_is_refused(local_data, tmp_path):
    batches = mixture(local_data).host_batches()
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), save_every=1)
    state = {"w": jnp.zeros(2)}
    checkpoints.save(1, state=state, batches=batches, meta={"model_config": {"d_model": 64}})
    checkpoints.close()
    with pytest.raises(CheckpointMismatchError, match="d_model: saved 64 vs now 128"):
        Checkpoints(str(tmp_path / "ckpt"), save_every=1).restore(
            1, abstract_state=state, batches=batches, meta={"model_config": {"d_model": 128}}
        )


def train_cli(local_data, run_dir, num_steps: int) -> list[dict]:
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        f"NUM_STEPS = {num_steps}",
        "warmup_cosine.total_steps = 12",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 4",
        "MixtureInput.seq_len = 64",
        "train.log_every = 2",
        "train.checkpoint_every = 3",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    code = cli.main(["train", "--gin_file", SMOKE, "--run_dir", str(run_dir), *flags])
    assert code == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_training_interrupted_and_resumed_matches_uninterrupted(local_data, tmp_path):
    straight = train_cli(local_data, tmp_path / "straight", 12)
    train_cli(local_data, tmp_path / "resumed", 6)  # "Killed" after the step-6 checkpoint.
    resumed = train_cli(local_data, tmp_path / "resumed", 12)
    by_step = {record["step"]: record for record in resumed}
    for record in straight:
        if record["step"] > 6:
            assert by_step[record["step"]]["mixture_phase"] == record["mixture_phase"]
            assert by_step[record["step"]]["loss"] == pytest.approx(record["loss"], rel=1e-5)
