"""Two JAX processes on localhost: each reads only its shard, the global batch is their union,
each resumes its own input from a shared checkpoint; and one two-process training run, which the
rest share: it validates what one device measures, resumes exactly past checkpoints damaged on one
host, and a SIGTERM to one process stops both at one step, saved, to resume exactly."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from codemix_jax import gin_config, sharding
from codemix_jax.data import SOURCES, build_local_corpus, load_vocab
from codemix_jax.data.corpus import read_documents
from codemix_jax.eval.validation import Validator
from codemix_jax.train_state import build_train_program

SCRIPT = os.path.join(os.path.dirname(__file__), "multihost_input.py")
EOS_ID = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    """A few to a few dozen documents per source in several files (one file for code, so seqio
    shards it by document instead): small enough to read more than an epoch of in seconds."""
    corpus_dir = str(tmp_path_factory.mktemp("small_corpus"))
    build_local_corpus(out_dir=corpus_dir, max_bytes_per_source=20_000, docs_per_shard=2)
    return corpus_dir


def run_two_processes(local_data, small_corpus, out_dir) -> list[dict[str, np.ndarray]]:
    port = str(free_port())
    args = [port, local_data.corpus_dir, small_corpus, local_data.vocab_path, str(out_dir)]
    processes = [
        subprocess.Popen(
            [sys.executable, SCRIPT, str(i), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    return [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(2)]


def test_hosts_read_disjoint_shards_and_assemble_the_global_batch(
    local_data, small_corpus, tmp_path
):
    first, second = run_two_processes(local_data, small_corpus, tmp_path)

    # The global batch is host 0's rows followed by host 1's: nothing lost, nothing repeated.
    expected = np.concatenate([first["host_rows"], second["host_rows"]], axis=1)
    np.testing.assert_array_equal(first["global_rows"], expected)
    np.testing.assert_array_equal(second["global_rows"], expected)
    rows = [tuple(row) for row in expected.reshape(-1, expected.shape[-1])]
    assert len(set(rows)) == len(rows)

    # Each host resumes its own input exactly from the shared (two-process) checkpoint.
    for host in (first, second):
        np.testing.assert_array_equal(host["after_restore"], host["after_save"])

    # Per source, the documents the hosts were delivered (over at least an epoch of a small corpus)
    # partition the source's documents, read here straight from its files.
    vocab = load_vocab(local_data.vocab_path)
    for source_id, source in enumerate(SOURCES):
        corpus = Counter(read_documents(corpus_dir=small_corpus, source=source, split="train"))
        ours, theirs = (delivered_documents(host, source_id, vocab) for host in (first, second))
        assert ours and theirs, source
        # A text the corpus holds twice may rightly reach both hosts (one copy each).
        assert not {text for text in ours & theirs if corpus[text] == 1}, source
        assert ours | theirs == set(corpus), source  # nothing lost, nothing made up


def delivered_documents(host: dict[str, np.ndarray], source_id: int, vocab) -> set[str]:
    """The documents of one source in a host's delivered rows, decoded.

    That source's rows, in delivery order, are its packed token stream: documents each ending
    in EOS, the last one cut off where the run stopped (dropped here).
    """
    mine = host["delivered_source_id"] == source_id
    assert (host["delivered_segment_ids"][mine] > 0).all()  # full rows: no padding in the stream
    stream = host["delivered_targets"][mine].reshape(-1)
    *documents, _ = np.split(stream, np.flatnonzero(stream == EOS_ID) + 1)
    return {vocab.decode(document[:-1].tolist()) for document in documents}


LAUNCHER = os.path.join(gin_config.REPO_ROOT, "launch", "local_multiprocess.sh")
SMOKE = "gin/experiments/smoke.gin"
TIMING_KEYS = {"tokens_per_second", "step_time_s", "mfu"}
HANG_SECONDS = 300  # a two-process run of 16 steps takes under a minute
# One straight two-process run serves every test below (each launch pays JAX's start-up and the
# compile): long enough that a signal sent at step 3 lands well before the end, checkpoints at
# 4, 8, 12 and 16 (the newest three kept), validation at 4, 8, 12 and 16.
NUM_STEPS = 16
STRAIGHT = [
    "train.checkpoint_every = 4",
    "Validation.every = 4",
    "Validation.rows = 3",
]
# The preempted runs: no save but the one the signal asks for and the last, and no validation
# (not what they test; its compiles cost seconds). Neither changes what is trained.
PREEMPTED = ["train.checkpoint_every = 1000", "train.validation = None"]


def bindings(local_data, *extra: str) -> list[str]:
    return [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        f"NUM_STEPS = {NUM_STEPS}",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 1",
        *extra,
    ]


def flags(values: list[str]) -> list[str]:
    return [flag for binding in values for flag in ("--gin_bindings", binding)]


def train_two_processes(local_data, run_dir) -> list[dict]:
    """Train (or resume ``run_dir``) with two local processes as the straight run does; returns
    metrics.jsonl's records as a list, so that a step logged twice would show."""
    env = {**os.environ, "CODEMIX": os.path.join(os.path.dirname(sys.executable), "codemix")}
    command = [LAUNCHER, "2", "2", "--gin_file", SMOKE]
    launcher = subprocess.Popen(
        [*command, "--run_dir", str(run_dir), *flags(bindings(local_data, *STRAIGHT))],
        cwd=gin_config.REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its process group: the processes it starts, to kill on a hang
    )
    try:
        _, stderr = launcher.communicate(timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail(f"hung for {HANG_SECONDS} s:\n" + "".join(process_logs(run_dir))[-5000:])
    assert launcher.returncode == 0, stderr + "".join(process_logs(run_dir))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def process_logs(run_dir) -> list[str]:
    return [(run_dir / f"process_{i}.log").read_text() for i in range(2)]


def without_timing(record: dict) -> dict:
    """A metrics record less its wall-clock figures (losses, grad norm, token shares, LR...)."""
    return {key: value for key, value in record.items() if key not in TIMING_KEYS}


def validation_scalars(record: dict) -> dict[str, float]:
    return {key: value for key, value in record.items() if key.startswith("val/")}


@pytest.fixture(scope="module")
def straight_two_processes(local_data, tmp_path_factory):
    """A 16-step two-process run (checkpoints at 8, 12 and 16 kept): its dir and its records."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, train_two_processes(local_data, run_dir)


def test_a_two_process_run_logs_every_step_once_and_validates_at_the_configured_steps(
    straight_two_processes,
):
    straight_dir, straight = straight_two_processes
    assert [record["step"] for record in straight] == list(range(1, NUM_STEPS + 1))
    assert straight[-1]["loss"] < straight[0]["loss"]
    validated = {r["step"]: validation_scalars(r) for r in straight if validation_scalars(r)}
    assert sorted(validated) == [4, 8, 12, 16]
    assert all(len(scalars) == 8 for scalars in validated.values())  # 3 sources and all, 2 each
    for log in process_logs(straight_dir):
        assert "validation at step 16" in log
    assert sorted(os.listdir(straight_dir / "checkpoints")) == ["12", "16", "8"]


def test_two_processes_measure_what_one_does(local_data, straight_two_processes):
    """Two processes of two devices, each giving its half of every validation batch, and one
    device measuring the params the two saved: the same figures, at every kept checkpoint."""
    straight_dir, straight = straight_two_processes
    logged = {r["step"]: validation_scalars(r) for r in straight if validation_scalars(r)}
    measured = one_device_validation(local_data, straight_dir, steps=[8, 12, 16])
    for step, scalars in measured.items():
        assert len(scalars) == 8
        assert logged[step] == pytest.approx(scalars, rel=1e-6), step


def one_device_validation(local_data, run_dir, steps: list[int]) -> dict[int, dict]:
    """The straight run's validation, by this process on one device, of its saved params."""
    gin_config.parse([SMOKE], bindings(local_data, *STRAIGHT))
    try:
        args = gin.get_bindings("train")
        dataset, rules = args["dataset"], args["rules"]
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            program = build_train_program(
                model_config=args["model_config"],
                dataset=dataset,
                mesh=mesh,
                rules=rules,
                learning_rate=args["learning_rate"],
                optimizer=args["optimizer"],
            )
            validator = Validator(args["validation"], program=program, dataset=dataset)
            measured = {}
            for step in steps:
                params = jax.device_put(saved_params(run_dir, step), program.shardings.params)
                measured[step] = validator.run(step, params)
    finally:
        gin.clear_config()
    return measured


def saved_params(run_dir, step: int):
    """A saved train state's params, whatever devices wrote them, on this process's first one."""
    path = run_dir / "checkpoints" / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.tree.map(
        lambda saved: jax.ShapeDtypeStruct(saved.shape, saved.dtype, sharding=device),
        ocp.StandardCheckpointHandler().metadata(path).tree,
    )
    return ocp.StandardCheckpointer().restore(path, shapes)["params"]


@pytest.fixture(scope="module")
def resumed_past_damage(local_data, straight_two_processes, tmp_path_factory):
    """The straight run's checkpoints (8, 12, 16) in a fresh run dir, damaged on process 1 only:
    step 16's array files that process 1 wrote (process 0 reads none of them) and step 12's input
    position of process 1. The rerun must set both aside and resume from step 8, a checkpoint
    written while the straight run went on (an async save of donated buffers, mid-run)."""
    straight_dir, _ = straight_two_processes
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(straight_dir / "checkpoints", run_dir / "checkpoints")
    state = run_dir / "checkpoints" / "16" / "state"
    shard_files = list(state.glob("ocdbt.process_1/d/*"))
    assert shard_files, sorted(state.rglob("*"))
    for path in shard_files:
        path.write_bytes(b"garbled" * 64)
    (run_dir / "checkpoints" / "12" / "data" / "process_1-of-2" / "position").write_bytes(b"x")
    return run_dir, train_two_processes(local_data, run_dir)


def test_two_process_training_resumes_like_an_uninterrupted_run(
    straight_two_processes, resumed_past_damage
):
    """The resumed steps are the straight run's, each logged once, validation included."""
    _, straight = straight_two_processes
    run_dir, resumed = resumed_past_damage
    assert {"process_0-of-2", "process_1-of-2"} <= set(
        os.listdir(run_dir / "checkpoints" / "8" / "data")
    )
    assert [record["step"] for record in resumed] == list(range(9, NUM_STEPS + 1))
    for log in process_logs(run_dir):
        assert "resuming from the checkpoint at step 8" in log
        assert f"training steps 9..{NUM_STEPS}" in log
    # Bit-equal: the same compiled step on the same restored state and the same batches.
    for ours, theirs in zip(resumed, straight[8:], strict=True):
        assert without_timing(ours) == without_timing(theirs)


def test_a_position_damaged_on_one_host_is_set_aside_by_both(resumed_past_damage):
    """Process 1's input position in step 12 is garbled: both processes agree before orbax's
    collective restore (no one left waiting in it), set step 12 aside and go on to step 8."""
    run_dir, _ = resumed_past_damage
    first, second = process_logs(run_dir)
    assert "checkpoint at step 12 is damaged (failed to restore on process [1])" in first
    assert "checkpoint at step 12 is damaged (OSError: input position of process 1: " in second
    assert any(name.startswith("12-") for name in os.listdir(run_dir / "checkpoints_damaged"))


def test_arrays_damaged_that_only_one_host_reads_are_set_aside_by_both(resumed_past_damage):
    """Step 16's array files written by process 1 are garbled. Process 1 fails inside orbax's
    collective restore, process 0 does not; both still meet at its closing barrier, agree, set
    step 16 aside and go on to step 12 (and 8)."""
    run_dir, _ = resumed_past_damage
    first, second = process_logs(run_dir)
    assert "checkpoint at step 16 is damaged (failed to restore on process [1])" in first
    assert "checkpoint at step 16 is damaged (" in second
    assert "failed to restore on process" not in second
    assert any(name.startswith("16-") for name in os.listdir(run_dir / "checkpoints_damaged"))


# --- preemption: SIGTERM reaches one process of two --------------------------------------------


def start_two_processes(local_data, run_dir) -> list[subprocess.Popen]:
    """The straight run's training (see PREEMPTED), each process started here, to signal one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    coordinator = ["--coordinator_address", f"localhost:{free_port()}", "--num_processes", "2"]
    train = [sys.executable, "-m", "codemix_jax", "train", "--gin_file", SMOKE]
    processes = []
    for index in range(2):
        with open(run_dir / f"process_{index}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    [
                        *(*train, "--run_dir", str(run_dir)),
                        *flags(bindings(local_data, *PREEMPTED)),
                        *(*coordinator, "--process_id", str(index)),
                    ],
                    cwd=gin_config.REPO_ROOT,
                    env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return processes


def wait_for_step(log_path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG_SECONDS
    while f"step {step}/" not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def finish_both(processes: list[subprocess.Popen], run_dir) -> list[str]:
    outputs = []
    for index, process in enumerate(processes):
        process.wait(timeout=600)
        outputs.append((run_dir / f"process_{index}.log").read_text())
        assert process.returncode == 0, outputs[-1][-3000:]
    return outputs


def losses(records: list[dict]) -> dict[int, float]:
    """Step -> loss (a step logged again after a resume: the newest record)."""
    return {record["step"]: record["loss"] for record in records}


def test_two_processes_agree_on_one_step_when_one_is_told_to_stop(
    local_data, straight_two_processes, tmp_path
):
    """SIGTERM reaches one process only; JAX's preemption service stops both at one step, both
    save it and exit 0, and the rerun resumes to the straight run's losses, bit for bit."""
    run_dir = tmp_path / "run"
    processes = start_two_processes(local_data, run_dir)
    wait_for_step(run_dir / "process_1.log", 3, processes[1])
    processes[1].send_signal(signal.SIGTERM)
    outputs = finish_both(processes, run_dir)

    saved = sorted(int(name) for name in os.listdir(run_dir / "checkpoints") if name.isdigit())
    [stopped_at] = saved
    assert 3 <= stopped_at < NUM_STEPS
    for output in outputs:
        assert f"after step {stopped_at}: checkpoint saved" in output
    saved_inputs = os.listdir(run_dir / "checkpoints" / str(stopped_at) / "data")
    assert {"process_0-of-2", "process_1-of-2"} <= set(saved_inputs)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(losses(records)) == stopped_at

    for output in finish_both(start_two_processes(local_data, run_dir), run_dir):
        assert f"resuming from the checkpoint at step {stopped_at}" in output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(losses(records)) == list(range(1, NUM_STEPS + 1))
    assert losses(records) == losses(straight_two_processes[1])  # floats compared exactly
