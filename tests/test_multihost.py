"""Two JAX processes on localhost: each reads only its shard, the global batch is their union,
each resumes its own input from a shared checkpoint, and two-process training resumes exactly."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from codemix_jax import gin_config
from codemix_jax.data import SOURCES, build_local_corpus, load_vocab
from codemix_jax.data.corpus import read_documents

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
TIMING_KEYS = {"tokens_per_second", "step_time_s", "mfu"}
HANG_SECONDS = 300  # a two-process run of 8 steps takes about 30 s


def train_two_processes(local_data, run_dir, num_steps: int) -> list[dict]:
    """Train (or resume ``run_dir``) with two local processes; returns metrics.jsonl's records
    as a list, so that a step logged twice would show."""
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        f"NUM_STEPS = {num_steps}",
        "warmup_cosine.total_steps = 8",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 1",
        "train.checkpoint_every = 4",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    env = {**os.environ, "CODEMIX": os.path.join(os.path.dirname(sys.executable), "codemix")}
    command = [LAUNCHER, "2", "2", "--gin_file", "gin/experiments/smoke.gin"]
    launcher = subprocess.Popen(
        [*command, "--run_dir", str(run_dir), *flags],
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


@pytest.fixture(scope="module")
def straight_two_processes(local_data, tmp_path_factory):
    """An 8-step two-process run (checkpoints at 4 and 8): its dir and its metrics records."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, train_two_processes(local_data, run_dir, 8)


def test_two_process_training_resumes_like_an_uninterrupted_run(
    local_data, straight_two_processes, tmp_path
):
    """Resume from a checkpoint written while the straight run went on (an async save of donated
    buffers, mid-run): the resumed steps must be the straight run's, each logged once."""
    straight_dir, straight = straight_two_processes
    assert [record["step"] for record in straight] == list(range(1, 9))
    assert straight[-1]["loss"] < straight[0]["loss"]

    # A fresh run dir holding only the straight run's checkpoint at step 4 (orbax finds a step by
    # its directory; nothing else in checkpoints/ is needed).
    saved = straight_dir / "checkpoints" / "4"
    assert {"process_0-of-2", "process_1-of-2"} <= set(os.listdir(saved / "data"))
    shutil.copytree(saved, tmp_path / "resumed" / "checkpoints" / "4")
    resumed = train_two_processes(local_data, tmp_path / "resumed", 8)

    assert [record["step"] for record in resumed] == [5, 6, 7, 8]
    for log in process_logs(tmp_path / "resumed"):
        assert "resuming from the checkpoint at step 4" in log
        assert "training steps 5..8" in log
    # Bit-equal: the same compiled step on the same restored state and the same batches.
    for ours, theirs in zip(resumed, straight[4:], strict=True):
        assert without_timing(ours) == without_timing(theirs)


def without_timing(record: dict) -> dict:
    """A metrics record less its wall-clock figures (losses, grad norm, token shares, LR...)."""
    return {key: value for key, value in record.items() if key not in TIMING_KEYS}


def test_a_position_damaged_on_one_host_is_set_aside_by_both(
    local_data, straight_two_processes, tmp_path
):
    """Process 1's input position in step 8 is garbled: both processes agree before orbax's
    collective restore (no one left waiting in it), set step 8 aside and resume from 4."""
    straight_dir, straight = straight_two_processes
    run_dir = tmp_path / "run"
    shutil.copytree(straight_dir / "checkpoints", run_dir / "checkpoints")
    (run_dir / "checkpoints" / "8" / "data" / "process_1-of-2" / "position").write_bytes(b"x")

    resumed = train_two_processes(local_data, run_dir, 8)

    assert [record["step"] for record in resumed] == [5, 6, 7, 8]
    first, second = process_logs(run_dir)
    assert "checkpoint at step 8 is damaged (failed to restore on process [1])" in first
    assert "checkpoint at step 8 is damaged (OSError: input position of process 1: " in second
    for log in (first, second):
        assert "resuming from the checkpoint at step 4" in log
    for ours, theirs in zip(resumed, straight[4:], strict=True):
        assert without_timing(ours) == without_timing(theirs)


def test_arrays_damaged_that_only_one_host_reads_are_set_aside_by_both(
    local_data, straight_two_processes, tmp_path
):
    """Step 8's array files written by process 1 (its shards: process 0 reads none of them) are
    garbled. Process 1 fails inside orbax's collective restore, process 0 does not; both still
    meet at its closing barrier, agree, set step 8 aside and resume from 4."""
    straight_dir, straight = straight_two_processes
    run_dir = tmp_path / "run"
    shutil.copytree(straight_dir / "checkpoints", run_dir / "checkpoints")
    shard_files = list((run_dir / "checkpoints" / "8" / "state").glob("ocdbt.process_1/d/*"))
    assert shard_files, sorted((run_dir / "checkpoints" / "8" / "state").rglob("*"))
    for path in shard_files:
        path.write_bytes(b"garbled" * 64)

    resumed = train_two_processes(local_data, run_dir, 8)

    assert [record["step"] for record in resumed] == [5, 6, 7, 8]
    first, second = process_logs(run_dir)
    assert "checkpoint at step 8 is damaged (failed to restore on process [1])" in first
    assert "checkpoint at step 8 is damaged (" in second
    assert "failed to restore on process" not in second
    for log in (first, second):
        assert "resuming from the checkpoint at step 4" in log
    for ours, theirs in zip(resumed, straight[4:], strict=True):
        assert without_timing(ours) == without_timing(theirs)
