"""Two JAX processes on localhost: each reads only its shard, the global batch is their union,
and each resumes its own input from a shared checkpoint."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from codemix_jax import gin_config
from codemix_jax.data.corpus import read_documents

SCRIPT = os.path.join(os.path.dirname(__file__), "multihost_input.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(local_data, out_dir) -> list[dict[str, np.ndarray]]:
    port = str(free_port())
    args = [port, local_data.corpus_dir, local_data.vocab_path, str(out_dir)]
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


def test_hosts_read_disjoint_shards_and_assemble_the_global_batch(local_data, tmp_path):
    first, second = run_two_processes(local_data, tmp_path)

    # The global batch is host 0's rows followed by host 1's: nothing lost, nothing repeated.
    expected = np.concatenate([first["host_rows"], second["host_rows"]], axis=1)
    np.testing.assert_array_equal(first["global_rows"], expected)
    np.testing.assert_array_equal(second["global_rows"], expected)
    rows = [tuple(row) for row in expected.reshape(-1, expected.shape[-1])]
    assert len(set(rows)) == len(rows)

    # Each host resumes its own input exactly from the shared (two-process) checkpoint.
    for host in (first, second):
        np.testing.assert_array_equal(host["after_restore"], host["after_save"])

    # Per source, the hosts' documents partition the source: no duplicates, no gaps. (Counted as
    # multisets: the corpus itself may hold the same text twice.)
    for key in (k for k in first if k.startswith("docs_")):
        ours, theirs = Counter(first[key].tolist()), Counter(second[key].tolist())
        assert ours and theirs, key
        everything = Counter(_all_documents(local_data, key.removeprefix("docs_")))
        assert ours + theirs == everything, key


def _all_documents(local_data, source_name: str) -> list[str]:
    return [
        hashlib.sha256(text.encode()).hexdigest()
        for text in read_documents(
            corpus_dir=local_data.corpus_dir, source=source_name, split="train"
        )
    ]


LAUNCHER = os.path.join(gin_config.REPO_ROOT, "launch", "local_multiprocess.sh")


def train_two_processes(local_data, run_dir, num_steps: int) -> dict[int, float]:
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        f"NUM_STEPS = {num_steps}",
        "warmup_cosine.total_steps = 8",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 2",
        "train.checkpoint_every = 4",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    env = {**os.environ, "CODEMIX": os.path.join(os.path.dirname(sys.executable), "codemix")}
    command = [LAUNCHER, "2", "2", "--gin_file", "gin/experiments/smoke.gin"]
    result = subprocess.run(
        [*command, "--run_dir", str(run_dir), *flags],
        cwd=gin_config.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join((run_dir / f"process_{i}.log").read_text()[-2000:] for i in range(2))
    assert result.returncode == 0, result.stderr + logs
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def test_two_process_training_resumes_like_an_uninterrupted_run(local_data, tmp_path):
    straight = train_two_processes(local_data, tmp_path / "straight", 8)
    train_two_processes(local_data, tmp_path / "resumed", 4)
    resumed = train_two_processes(local_data, tmp_path / "resumed", 8)
    assert sorted(straight) == [2, 4, 6, 8]
    assert straight[8] < straight[2]
    for step in (6, 8):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)
    inputs = os.listdir(tmp_path / "resumed" / "checkpoints" / "8" / "data")
    assert {"process_0-of-2", "process_1-of-2"} <= set(inputs)
