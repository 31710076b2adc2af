"""`codemix aot --topology local --save_compiled` then `codemix train --compiled_step`: the saved
executable is what trains, bit for bit like a run that compiles its own step, and a step saved
for another program is refused before the run writes anything."""

import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codemix_jax import aot, cli

SMOKE = "gin/experiments/smoke.gin"
STEPS = 3
STEP_COMPILED = "Finished XLA compilation of jit(step)"  # jax's log line, with log_compiles


def bindings(local_data, *extra: str) -> list[str]:
    """The smoke model on a small batch; ``extra`` bindings come last."""
    data = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "MixtureInput.seq_len = 32",
        "MixtureInput.global_batch_size = 4",
        f"NUM_STEPS = {STEPS}",
        "WARMUP_STEPS = 1",
        "train.log_every = 1",
    ]
    return [flag for binding in [*data, *extra] for flag in ("--gin_bindings", binding)]


def train(local_data, run_dir, *flags: str, extra: tuple[str, ...] = ()) -> int:
    args = ["train", "--gin_file", SMOKE, "--run_dir", str(run_dir), *flags]
    return cli.main([*args, *bindings(local_data, *extra)])


@pytest.fixture(scope="module")
def saved_step(local_data, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("aot") / "step.pkl")
    args = ["aot", "--gin_file", SMOKE, "--topology", "local", "--save_compiled", path]
    assert cli.main([*args, *bindings(local_data)]) == 0
    return path


def test_local_target_is_this_hosts_devices():
    local = aot.compile_target("local")
    assert local.devices() == jax.devices() and local.chips == len(jax.devices())
    assert local.hbm_bytes > 2**20
    with pytest.raises(ValueError, match="num_slices is for TPU slices; 'local' got 2"):
        aot.compile_target("local", num_slices=2)


def results(run_dir) -> tuple[list[dict], list[np.ndarray]]:
    """Every logged metric but the timings, and the final state's arrays."""
    timings = {"tokens_per_second", "step_time_s", "mfu"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]
    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(STEPS) / "state")
    return records, jax.tree.leaves(state)


def test_training_runs_the_saved_step_bit_for_bit(local_data, saved_step, tmp_path, caplog):
    """The loaded run compiles no step of its own, and ends exactly where a compiling run does."""
    with caplog.at_level(logging.INFO), jax.log_compiles():
        assert train(local_data, tmp_path / "loaded", "--compiled_step", saved_step) == 0
        loaded_log = caplog.text
        caplog.clear()
        assert train(local_data, tmp_path / "compiled") == 0
    assert f"loaded the compiled train step from {saved_step}" in loaded_log
    assert STEP_COMPILED not in loaded_log
    assert STEP_COMPILED in caplog.text  # the check above would see a compile
    loaded_records, loaded_state = results(tmp_path / "loaded")
    compiled_records, compiled_state = results(tmp_path / "compiled")
    assert [r["step"] for r in loaded_records] == list(range(1, STEPS + 1))
    assert loaded_records == compiled_records
    for loaded, compiled in zip(loaded_state, compiled_state, strict=True):
        np.testing.assert_array_equal(loaded, compiled)
    assert f"train.compiled_step = '{saved_step}'" in (tmp_path / "loaded/config.gin").read_text()


@pytest.mark.parametrize(
    ("binding", "difference"),
    [
        (
            "MixtureInput.global_batch_size = 8",
            "batch.inputs: saved int32[4, 32] sharded (('data', 'fsdp'), None) "
            "vs now int32[8, 32] sharded (('data', 'fsdp'), None)",
        ),
        ("ModelConfig.d_model = 32", "state.params.final_norm.scale: saved float32[64] sharded"),
        ("PEAK_LR = 1e-3", "traced step: saved sha256 "),  # the same shapes, another program
    ],
    ids=["batch size", "model", "learning rate"],
)
def test_a_step_of_another_program_is_refused_before_writing(
    local_data, saved_step, tmp_path, caplog, binding, difference
):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = train(local_data, run_dir, "--compiled_step", saved_step, extra=(binding,))
    assert code == 2
    assert f"the compiled step at {saved_step} is not this run's step" in caplog.text
    assert difference in caplog.text
    assert not run_dir.exists()


def test_a_missing_compiled_step_is_named(local_data, tmp_path, caplog):
    missing = str(tmp_path / "nowhere.pkl")
    with caplog.at_level(logging.ERROR):
        assert train(local_data, tmp_path / "run", "--compiled_step", missing) == 2
    assert f"no compiled step at {missing}" in caplog.text
    assert not (tmp_path / "run").exists()
