"""A stage starts from another run's checkpoint (train.init_from): params only or with the optimizer
state, at step 0 with its own mixture; resharded onto another mesh and process count; recorded in
its meta and guarded on resume. And the keep policy for evaluation (train.keep_every)."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_multihost import free_port
from test_resume import mixture, records, saved_state, train_cli

from codemix_jax import gin_config
from codemix_jax.checkpoint import Checkpoints

SOURCE_STEPS = 10
# A stage of a step or two: its warmup (from LR 0 at step 1) must end within it.
STAGE = [
    "MixtureInput.phases = None",
    "MixtureInput.shares = {'markup': 1.0}",
    "WARMUP_STEPS = 1",
]
MESH_SCRIPT = os.path.join(os.path.dirname(__file__), "init_from_mesh.py")


@pytest.fixture(scope="module")
def source_run(local_data, tmp_path_factory):
    """The first stage: test_resume's run for 10 steps on one device, saving every 2, keeping the
    newest and every 4th: steps 4, 8 and 10 remain."""
    run_dir = tmp_path_factory.mktemp("source")
    keep = ["train.checkpoint_every = 2", "train.keep_checkpoints = 1", "train.keep_every = 4"]
    assert train_cli(local_data, run_dir, *keep, num_steps=SOURCE_STEPS) == 0
    return run_dir


def init_bindings(run_dir, step=None, with_optimizer=False) -> list[str]:
    return [
        "train.init_from = @InitFrom()",
        f"InitFrom.run_dir = '{run_dir}'",
        f"InitFrom.step = {step}",
        f"InitFrom.with_optimizer = {with_optimizer}",
    ]


def checkpoint_meta(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


# A saved opt_state: (clip_by_global_norm, adamw = (scale_by_adam, masked weight decay, schedule)).
def adam_count(state: dict) -> int:
    return int(state["opt_state"][1][0]["count"])


def schedule_count(state: dict) -> int:
    return int(state["opt_state"][1][2]["count"])


def saved_arrays(run_dir, step: int) -> dict:
    """A saved train state, whatever devices wrote it, as arrays on this process's first device."""
    path = run_dir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.tree.map(
        lambda saved: jax.ShapeDtypeStruct(saved.shape, saved.dtype, sharding=device),
        ocp.StandardCheckpointHandler().metadata(path).tree,
    )
    return checkpointer.restore(path, shapes)


def train_and_log(
    caplog, local_data, run_dir, bindings, *, num_steps: int, every: int = 1
) -> tuple[int, str]:
    """Train (or resume) a stage, checkpointing every ``every`` steps; the exit status, the log."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = train_cli(
            local_data,
            run_dir,
            *bindings,
            f"train.checkpoint_every = {every}",
            num_steps=num_steps,
        )
    return status, caplog.text


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["params_only", "with_optimizer"])
def test_a_stage_starts_from_another_runs_checkpoint(
    local_data, source_run, tmp_path, caplog, with_optimizer
):
    """The stage's step 1 runs at LR schedule(0) = 0 (warmup), so the params it saves are the ones
    it started from: they must be the source's newest, bit for bit."""
    run_dir = tmp_path / "stage"
    bindings = [*STAGE, *init_bindings(source_run, with_optimizer=with_optimizer)]
    status, logs = train_and_log(caplog, local_data, run_dir, bindings, num_steps=2, every=1)
    assert status == 0
    parts = "params and optimizer state" if with_optimizer else "params only"
    assert f"initialising from {source_run}/checkpoints step {SOURCE_STEPS} ({parts})" in logs
    assert "training steps 1..2" in logs
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["token_share/markup"] == 1.0 for r in logged)  # the stage's own mixture
    assert logged[0]["learning_rate"] == 0.0

    source, stage = saved_state(source_run, SOURCE_STEPS), saved_state(run_dir, 1)
    jax.tree.map(np.testing.assert_array_equal, stage["params"], source["params"])
    assert int(stage["step"]) == 1
    assert schedule_count(stage) == 1  # the stage's own schedule, from its own step 0
    # Adam's count goes on from the source's, with its moments; a fresh optimizer's from 0.
    assert adam_count(stage) == (adam_count(source) if with_optimizer else 0) + 1

    source_meta = json.dumps(checkpoint_meta(source_run, SOURCE_STEPS), sort_keys=True)
    assert checkpoint_meta(run_dir, 2)["init_from"] == {
        "run_dir": str(source_run),
        "step": SOURCE_STEPS,
        "config_hash": "sha256:" + hashlib.sha256(source_meta.encode()).hexdigest(),
        "with_optimizer": with_optimizer,
    }


def test_an_interrupted_stage_resumes_and_refuses_another_init(
    local_data, source_run, tmp_path, caplog
):
    """Once the stage has a checkpoint it resumes from it, never re-initialising; a resume asking
    for another init than the stage started with is refused by name, before anything is written."""
    run_dir = tmp_path / "stage"
    init = init_bindings(source_run, step=4)
    assert train_and_log(caplog, local_data, run_dir, [*STAGE, *init], num_steps=1, every=1)[0] == 0
    refusals = {
        "InitFrom.step: saved 4 vs now 8": init_bindings(source_run, step=8),
        "InitFrom.with_optimizer: saved False vs now True": init_bindings(
            source_run, step=4, with_optimizer=True
        ),
        f"InitFrom.run_dir: saved '{source_run}' vs now None": [],
    }
    for named, other in refusals.items():
        status, logs = train_and_log(caplog, local_data, run_dir, [*STAGE, *other], num_steps=2)
        assert status == 2 and named in logs, logs
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["1"]
        assert [r["step"] for r in records(run_dir)] == [1]
    # The newest checkpoint of the source is no longer step 4: a resume does not care.
    status, logs = train_and_log(caplog, local_data, run_dir, [*STAGE, *init], num_steps=2)
    assert status == 0
    assert "resuming from the checkpoint at step 1" in logs and "initialising" not in logs
    assert [r["step"] for r in records(run_dir)] == [1, 2]
    assert checkpoint_meta(run_dir, 2)["init_from"]["step"] == 4


# Sources not there, or of another model or optimizer: (bindings given the source run, error).
BAD_SOURCES = {
    "missing_run": (
        lambda source: init_bindings("/nonexistent/h1_run"),
        "InitFrom.run_dir '/nonexistent/h1_run' has no checkpoint",
    ),
    "missing_step": (
        lambda source: init_bindings(source, step=9),
        "has no checkpoint at step 9 (it has steps [4, 8, 10])",
    ),
    "other_model": (
        lambda source: [*init_bindings(source), "ModelConfig.d_ff = 128"],
        "another model (ModelConfig.d_ff: saved 256 vs now 128)",
    ),
    "other_optimizer": (
        lambda source: [*init_bindings(source, with_optimizer=True), "adamw.clip_norm = None"],
        "holds another params and opt_state than this run's (missing: opt_state.0.0.count",
    ),
}


def test_a_damaged_init_source_is_named_with_its_step_and_cause(
    local_data, source_run, tmp_path, caplog
):
    """The source stage's newest checkpoint (10): its array files truncated after it finished."""
    source = tmp_path / "source"
    shutil.copytree(source_run / "checkpoints", source / "checkpoints")
    for path in (source / "checkpoints" / "10" / "state" / "d").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    run_dir = tmp_path / "stage"
    status, logs = train_and_log(
        caplog, local_data, run_dir, [*STAGE, *init_bindings(source)], num_steps=2
    )
    assert status == 2, logs
    assert f"cannot initialise from {source / 'checkpoints'} step 10: it does not restore (" in logs
    assert "Move that step aside and rerun" in logs
    assert not run_dir.exists()


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_a_bad_init_source_is_named_before_anything_is_written(
    local_data, source_run, tmp_path, caplog, case
):
    bindings, named = BAD_SOURCES[case]
    run_dir = tmp_path / "stage"
    status, logs = train_and_log(
        caplog, local_data, run_dir, [*STAGE, *bindings(source_run)], num_steps=2
    )
    assert status == 2 and named in logs, logs
    assert not run_dir.exists()


def test_keep_every_keeps_the_newest_and_every_multiple(local_data, source_run, tmp_path):
    """Orbax's keep policies, for real: the newest ``keep`` or a multiple of ``keep_every``."""
    assert sorted(int(p) for p in os.listdir(source_run / "checkpoints")) == [4, 8, 10]

    checkpoints = Checkpoints(str(tmp_path / "ckpt"), save_every=2, keep=2, keep_every=4)
    batches = mixture(local_data).host_batches()
    for step in filter(checkpoints.due, range(1, 13)):
        checkpoints.save(step, state={"w": jnp.full(2, step)}, batches=batches, meta={})
    checkpoints.close()
    assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt")) == [4, 8, 10, 12]
    for keep_every in (3, -2):
        with pytest.raises(ValueError, match=f"keep_every={keep_every} must be 0"):
            Checkpoints(str(tmp_path / "other"), save_every=2, keep_every=keep_every)
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        Checkpoints(str(tmp_path / "other"), save_every=2, keep=0)
    assert not (tmp_path / "other").exists()


def run_script(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, MESH_SCRIPT, *args],
        cwd=gin_config.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def test_init_reshards_from_other_meshes_and_process_counts(local_data, source_run, tmp_path):
    """Taken by one process under data=2, fsdp=4 on 8 devices, with the optimizer state: the
    trained one-device source, and a state saved by two processes (fsdp=4 over 2 x 2 devices)."""
    data = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
    ]
    two_processes = tmp_path / "two_processes"
    writer = json.dumps({"bindings": data, "run_dir": str(two_processes)})
    port = str(free_port())
    for writer_process in [run_script("write", writer, port, str(i)) for i in range(2)]:
        finish(writer_process)
    assert {"process_0-of-2", "process_1-of-2"} <= set(
        os.listdir(two_processes / "checkpoints" / "1" / "data")
    )

    sources = [(source_run, SOURCE_STEPS), (two_processes, 1)]
    (tmp_path / "out").mkdir()
    spec = {
        "bindings": data,
        "out": str(tmp_path / "out"),
        "sources": [[str(run_dir), step] for run_dir, step in sources],
    }
    output = finish(run_script("init", json.dumps(spec)))
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert report == {"mesh": {"data": 2, "fsdp": 4, "tensor": 1}, "misplaced": [0, 0]}
    for index, (run_dir, step) in enumerate(sources):
        saved = saved_arrays(run_dir, step)
        saved["opt_state"][1][2]["count"] = np.zeros((), np.int32)  # the stage's schedule: 0
        expected = jax.tree.leaves({"params": saved["params"], "opt_state": saved["opt_state"]})
        restored = np.load(tmp_path / "out" / f"{index}.npz")
        assert int(restored["step"]) == 0
        assert len(restored.files) == len(expected) + 1
        for i, wanted in enumerate(expected):
            np.testing.assert_array_equal(restored[f"leaf_{i}"], wanted, err_msg=f"{run_dir} {i}")
