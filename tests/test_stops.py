"""Runs that must stop at once, naming why: a diverging loss (exit 3, nothing non-finite saved) and
settings that cannot work (exit 2 before compiling, nothing written)."""

import json
import logging
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codemix_jax import cli

SMOKE = "gin/experiments/smoke.gin"


def train(local_data, run_dir, *bindings: str) -> int:
    settings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 12",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 1",
        *bindings,
    ]
    flags = [flag for binding in settings for flag in ("--gin_bindings", binding)]
    return cli.main(["train", "--gin_file", SMOKE, "--run_dir", str(run_dir), *flags])


# Adam moves every weight by about the LR: at 1e30 the second update makes the logits overflow.
EXPLODING = ("PEAK_LR = 1e30", "FINAL_LR = 1e29", "train.checkpoint_every = 1")


def first_nonfinite_step(run_dir) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["step"] for r in records if not math.isfinite(r["loss"] + r["grad_norm"]))


def saved_params(run_dir) -> dict[int, list[np.ndarray]]:
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()}
    )
    restore = ocp.args.Composite(state=ocp.args.StandardRestore())
    return {
        step: jax.tree.leaves(manager.restore(step, args=restore)["state"]["params"])
        for step in manager.all_steps()
    }


def test_a_diverging_run_stops_at_the_step_and_saves_nothing_of_it(local_data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert train(local_data, run_dir, *EXPLODING) == cli.EXIT_DIVERGED

    bad = first_nonfinite_step(run_dir)
    saved = saved_params(run_dir)
    assert sorted(saved) == list(range(1, bad))  # every step before it, none from it on
    for leaves in saved.values():
        assert all(np.isfinite(leaf).all() for leaf in leaves)
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message.startswith(f"step {bad} is not finite")
    assert f"the last checkpoint is step {bad - 1} in {run_dir / 'checkpoints'}" in message
    assert "\n" not in message


def test_skipping_keeps_the_state_and_stops_past_the_limit(local_data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    skip = ("NonFinitePolicy.skip = True", "NonFinitePolicy.max_skipped = 3")
    with caplog.at_level(logging.WARNING):
        code = train(local_data, run_dir, *EXPLODING, *skip, "train.keep_checkpoints = 20")
    assert code == cli.EXIT_DIVERGED

    skipped = [r.getMessage() for r in caplog.records if "update was skipped" in r.getMessage()]
    bad = int(skipped[0].split()[1])
    assert skipped == [
        f"step {bad + n} is not finite: its update was skipped ({n + 1} of at most 3)"
        for n in range(3)
    ]
    assert f"step {bad + 3} is the 4th non-finite step skipped, more than" in caplog.text
    # Steps up to bad + 2 were saved; the skipped ones hold the last finite step's params.
    saved = saved_params(run_dir)
    assert sorted(saved) == list(range(1, bad + 3))
    for step in range(bad, bad + 3):
        for before, after in zip(saved[bad - 1], saved[step], strict=True):
            np.testing.assert_array_equal(before, after)
    assert any((a != b).any() for a, b in zip(saved[bad - 2], saved[bad - 1], strict=True))


@pytest.mark.parametrize(
    "bindings, message",
    [
        (
            ["ModelConfig.vocab_size = 1000"],
            "ModelConfig.vocab_size = 1000 is smaller than the vocabulary",
        ),
        (["PEAK_LR = -1e-3"], "the learning rate schedule is negative at step 2: -0.0005"),
        (["PEAK_LR = 1e400"], "the learning rate schedule is not finite at step 1: nan"),
        (
            ["warmup_cosine.total_steps = 100", "WARMUP_STEPS = 50"],
            "the learning rate still rises at the last step 12",
        ),
        (["train.log_every = 0"], "train.log_every must be >= 1, got 0"),
        (["NonFinitePolicy.max_skipped = -1"], "NonFinitePolicy.max_skipped must be >= 0"),
        (["adamw.b2 = 1.0"], "adamw.b2 = 1.0 must be in [0, 1)"),
        (["adamw.weight_decay = -0.1"], "adamw.weight_decay = -0.1 must be >= 0"),
        (["adamw.clip_norm = 0.0"], "adamw.clip_norm = 0.0 must be > 0, or None: no clipping"),
    ],
)
def test_settings_that_cannot_work_stop_before_anything_is_written(
    local_data, tmp_path, caplog, bindings, message
):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert train(local_data, run_dir, *bindings) == 2
    [logged] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message in logged and "\n" not in logged
    assert not run_dir.exists()


def test_a_run_dir_that_cannot_be_written_is_named(local_data, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    with caplog.at_level(logging.ERROR):
        assert train(local_data, blocker / "run") == 2
        assert train(local_data, "/sys/codemix_run") == 2  # read-only, even for root
    assert f"cannot create run dir '{blocker / 'run'}': '{blocker}' is a file" in caplog.text
    assert "cannot write run dir '/sys/codemix_run' in '/sys'" in caplog.text
    assert blocker.read_text() == "in the way"
    assert not [name for name in os.listdir(tmp_path) if name != "a_file"]


def test_a_larger_model_vocabulary_is_fine_and_said_once(local_data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert (
            train(local_data, tmp_path / "run", "NUM_STEPS = 3", "ModelConfig.vocab_size = 2100")
            == 0
        )
    assert caplog.text.count("ModelConfig.vocab_size 2100 > the tokenizer's 2048 ids") == 1
