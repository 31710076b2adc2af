"""SIGTERM and SIGINT: every process finishes its step, they save at one step, exit 0, and the
rerun of the same command resumes to the losses of a run never stopped, bit for bit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codemix_jax import gin_config
from codemix_jax.preemption import watching_signals

# Long enough that a signal sent at step 3 lands well before the end (two processes step slower).
NUM_STEPS = 100
TWO_PROCESS_STEPS = 40


def train_command(local_data, run_dir: Path, num_steps: int = NUM_STEPS) -> list[str]:
    bindings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        f"NUM_STEPS = {num_steps}",
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(local_data, run_dir: Path) -> list[subprocess.Popen]:
    run_dir.mkdir(parents=True, exist_ok=True)
    coordinator = ["--coordinator_address", f"localhost:{free_port()}", "--num_processes", "2"]
    return [
        start(
            [
                *train_command(local_data, run_dir, TWO_PROCESS_STEPS),
                *(*coordinator, "--process_id", str(index)),
            ],
            run_dir / f"process_{index}.log",
            JAX_NUM_CPU_DEVICES="2",
        )
        for index in range(2)
    ]


def finish_both(processes: list[subprocess.Popen], run_dir: Path) -> list[str]:
    return [finish(p, run_dir / f"process_{i}.log") for i, p in enumerate(processes)]


def test_two_processes_agree_on_one_step_when_one_is_told_to_stop(local_data, tmp_path):
    """SIGTERM reaches one process only; JAX's preemption service stops both at one step."""
    straight = tmp_path / "straight"
    finish_both(start_two_processes(local_data, straight), straight)

    run_dir = tmp_path / "run"
    processes = start_two_processes(local_data, run_dir)
    wait_for_step(run_dir / "process_1.log", 3, processes[1])
    processes[1].send_signal(signal.SIGTERM)
    outputs = finish_both(processes, run_dir)

    [stopped_at] = saved_steps(run_dir)
    assert 3 <= stopped_at < TWO_PROCESS_STEPS
    for output in outputs:
        assert f"after step {stopped_at}: checkpoint saved" in output
    saved_inputs = os.listdir(run_dir / "checkpoints" / str(stopped_at) / "data")
    assert {"process_0-of-2", "process_1-of-2"} <= set(saved_inputs)

    finish_both(start_two_processes(local_data, run_dir), run_dir)
    assert losses(run_dir) == losses(straight)
