"""SIGTERM and SIGINT: the process finishes its step, saves it, exits 0, and the rerun of the same
command resumes to the losses of a run never stopped, bit for bit. (Two processes, one of them
told to stop: test_multihost, which shares its straight two-process run among several tests.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codemix_jax import gin_config
from codemix_jax.preemption import watching_signals

# Long enough that a signal sent at step 3 lands well before the end.
NUM_STEPS = 100


def train_command(local_data, run_dir: Path) -> list[str]:
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        f"NUM_STEPS = {NUM_STEPS}",
        "WARMUP_STEPS = 2",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 1",
        "train.checkpoint_every = 1000",  # no save but the one the signal asks for, and the last
        "train.validation = None",  # not what is tested here, and its compiles cost seconds
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    return [
        *(sys.executable, "-m", "codemix_jax", "train"),
        *("--gin_file", "gin/experiments/smoke.gin", "--run_dir", str(run_dir), *flags),
    ]


def start(command: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command,
            cwd=gin_config.REPO_ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_for_step(log_path: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while f"step {step}/" not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def finish(process: subprocess.Popen, log_path: Path) -> str:
    process.wait(timeout=600)
    output = log_path.read_text()
    assert process.returncode == 0, output[-3000:]
    return output


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (a step logged again after a resume: the newest record)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


def saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(name) for name in os.listdir(run_dir / "checkpoints") if name.isdigit())


@pytest.fixture(scope="module")
def straight_run(local_data, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    finish(
        start(train_command(local_data, run_dir), run_dir.parent / "log"), run_dir.parent / "log"
    )
    return losses(run_dir)


def test_sigint_is_caught_like_sigterm_and_a_second_one_stops_at_once():
    """In one process both signals take the same path; the run below is timed with SIGTERM."""
    before = signal.getsignal(signal.SIGINT)
    with watching_signals() as preemption:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.reached(1)
        assert str(preemption.stopped(1)).startswith("stopped by SIGINT after step 1")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM])
def test_a_signal_saves_the_step_exits_0_and_the_rerun_resumes_exactly(
    local_data, straight_run, tmp_path, stop_signal
):
    run_dir, log_path = tmp_path / "run", tmp_path / "log"
    process = start(train_command(local_data, run_dir), log_path)
    wait_for_step(log_path, 3, process)
    process.send_signal(stop_signal)
    output = finish(process, log_path)

    [stopped_at] = saved_steps(run_dir)
    assert 3 <= stopped_at < NUM_STEPS
    assert f"stopped by {stop_signal.name} after step {stopped_at}: checkpoint saved" in output
    assert max(losses(run_dir)) == stopped_at

    rerun = finish(start(train_command(local_data, run_dir), log_path), log_path)
    assert f"resuming from the checkpoint at step {stopped_at}" in rerun
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
    assert resumed == straight_run  # bit for bit: floats compared exactly
