"""No hangs: a slow step is named, a hung step ends the process, a job that lost a process ends
within a bounded time with a clear error, and a coordinator that never answers is named."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from codemix_jax import gin_config
from codemix_jax.watchdog import StepWatchdog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@jax.jit
def sleepy_step(x: jax.Array, seconds: jax.Array) -> jax.Array:
    """A real device computation whose run time we choose (the host callback sleeps)."""

    def sleep(value, duration):
        time.sleep(float(duration))
        return value

    return jax.pure_callback(sleep, jax.ShapeDtypeStruct(x.shape, x.dtype), x + 1, seconds)


def run_steps(policy: StepWatchdog, delays: list[float], **watching) -> None:
    x = jnp.zeros(())
    with policy.watching(**watching) as steps:
        for step, delay in enumerate(delays, start=1):
            x = steps.run(step, sleepy_step, x, jnp.float32(delay))
        x.block_until_ready()
        time.sleep(3 * policy.check_every_s)


def test_a_step_far_slower_than_the_median_is_named(caplog):
    policy = StepWatchdog(slow_factor=5, exit_after_s=0, min_steps=5, check_every_s=0.05)
    with caplog.at_level("WARNING", logger="codemix_jax.watchdog"):
        run_steps(policy, [1.0] + [0.02] * 10 + [1.0] + [0.02] * 5)  # the first is not timed
    named = [record.getMessage() for record in caplog.records]
    assert len(named) == 2, named  # while it runs, and when it ends; no other step
    assert named[0].startswith("step 12 has been running for")
    assert named[1].startswith("step 12 took 1.0 s") or named[1].startswith("step 12 took 1.1 s")
    assert "x the median step (0.02" in named[1]


def test_a_step_that_never_finishes_is_reported_as_hung():
    hung: list[str] = []
    policy = StepWatchdog(slow_factor=0, exit_after_s=0.5, min_steps=1, check_every_s=0.05)
    started = time.monotonic()
    run_steps(policy, [2.0] + [0.01] * 3 + [2.0], on_hang=hung.append)  # the first is not timed
    assert len(hung) == 1
    assert hung[0].startswith("step 5 has not finished after 1 s")  # 0.5 s, rounded
    assert "StepWatchdog.exit_after_s = 0.5" in hung[0]
    assert time.monotonic() - started < 7


def test_host_work_between_steps_is_not_step_time(caplog):
    """The host pausing (validation, saving) between fast steps does not make a step slow."""
    policy = StepWatchdog(slow_factor=5, exit_after_s=0, min_steps=3, check_every_s=0.05)
    x = jnp.zeros(())
    with caplog.at_level("WARNING", logger="codemix_jax.watchdog"), policy.watching() as steps:
        for step in range(1, 11):
            x = steps.run(step, sleepy_step, x, jnp.float32(0.02))
            x.block_until_ready()
            if step == 6:
                time.sleep(0.6)
    assert caplog.records == []


def test_a_coordinator_that_never_answers_is_named_within_the_timeout():
    address = f"localhost:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "codemix_jax", "train", "--gin_file", "gin/base.gin"),
            *("--run_dir", "/nonexistent/never-written", "--coordinator_address", address),
            *("--num_processes", "2", "--process_id", "1", "--distributed_timeout_s", "3"),
        ],
        cwd=gin_config.REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"could not join the job within 3 s: the coordinator at {address} did not answer" in (
        result.stderr
    )
    assert "Check failure stack trace" not in result.stderr  # ours, before jax's abort
    assert took < 60


# Two processes of one job; in each case one of them is stopped or killed mid-training.


def two_process_job(local_data, run_dir: Path, *bindings: str, heartbeat_s: int):
    port = free_port()
    settings = [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        "NUM_STEPS = 100000",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 2",
        "train.checkpoint_every = 100000",
        "train.validation = None",
        *bindings,
    ]
    flags = [flag for binding in settings for flag in ("--gin_bindings", binding)]
    processes = []
    for index in range(2):
        log_path = run_dir.parent / f"{run_dir.name}_process_{index}.log"
        with open(log_path, "w") as log:
            command = [
                *(sys.executable, "-m", "codemix_jax", "train"),
                *("--gin_file", "gin/experiments/smoke.gin", "--run_dir", str(run_dir), *flags),
                *("--coordinator_address", f"localhost:{port}", "--num_processes", "2"),
                *("--process_id", str(index), "--heartbeat_timeout_s", str(heartbeat_s)),
            ]
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=gin_config.REPO_ROOT,
                    env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return processes, [run_dir.parent / f"{run_dir.name}_process_{i}.log" for i in range(2)]


def wait_for_step(log_path: Path, step: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 400
    while f"step {step}/" not in log_path.read_text():
        assert all(p.poll() is None for p in processes), log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)


def wait_exit(process: subprocess.Popen, limit_s: float) -> float:
    """Seconds until ``process`` exits; it is killed (and the test fails) past ``limit_s``."""
    started = time.monotonic()
    try:
        process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"process {process.pid} still running {limit_s} s after its peer was lost")
    return time.monotonic() - started


def signal_at_step_10(processes, logs, signum: int, *, limit_s: float) -> float:
    """Send ``signum`` to process 1 once process 0 logged step 10; seconds until process 0 exits.
    Both are gone afterwards, whatever happened."""
    try:
        wait_for_step(logs[0], 10, processes)
        processes[1].send_signal(signum)
        return wait_exit(processes[0], limit_s=limit_s)
    finally:
        kill_all(processes)


def kill_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def killed_peer(local_data, tmp_path_factory):
    """Process 1 is SIGKILLed at step 10; how long process 0 takes to exit, and the logs."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    processes, logs = two_process_job(local_data, run_dir, heartbeat_s=10)
    took = signal_at_step_10(processes, logs, signal.SIGKILL, limit_s=120)
    print(f"process 0 exited {took:.1f} s after process 1 was killed")
    return run_dir, processes[0].returncode, took, logs[0].read_text(), logs[1].read_text()


def test_a_killed_process_ends_the_job_with_a_clear_error_in_bounded_time(killed_peer):
    _, returncode, took, survivor, _ = killed_peer
    assert returncode == 4, survivor[-3000:]
    assert "p0/2 codemix_jax.distributed: process 0 of 2: the job is broken (" in survivor
    assert "Another process probably died or was preempted" in survivor
    assert "Check failure stack trace" not in survivor  # ours, not jax's abort at shutdown
    assert took < 60  # the 10-s heartbeat bounds it; a collective error ends it at once


def test_every_process_labels_its_lines_and_process_0_alone_writes(killed_peer):
    run_dir, _, _, first, second = killed_peer
    first_pid = int(re.search(r"process 0 of 2, pid (\d+)", first).group(1))
    assert "p0/2 codemix_jax.train: training steps 1..100000" in first
    assert "p1/2 codemix_jax.train: training steps 1..100000" in second
    assert "p0/2 codemix_jax.metrics: step 10/100000" in first
    with open(run_dir / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps)) and 10 in steps  # each record once: one writer
    (events,) = os.listdir(run_dir / "tensorboard")  # one writer: process 0 (its pid is in it)
    assert f".{first_pid}." in events, (events, first_pid)
    assert (run_dir / "config.gin").exists()


def test_a_stopped_process_is_named_by_the_watchdog_and_the_job_ends(local_data, tmp_path):
    """Process 1 freezes (SIGSTOP): no error reaches process 0, which waits in a collective. Its
    watchdog names the step and exits 5 long before jax's 100-s heartbeat limit."""
    processes, logs = two_process_job(
        local_data, tmp_path / "run", "StepWatchdog.exit_after_s = 8", heartbeat_s=100
    )
    took = signal_at_step_10(processes, logs, signal.SIGSTOP, limit_s=90)
    survivor = logs[0].read_text()
    assert processes[0].returncode == 5, survivor[-3000:]
    assert re.search(
        r"step \d+ has not finished after [89] s \(StepWatchdog.exit_after_s = 8; ", survivor
    )
    assert "the job is hung (a process stuck or dead?)" in survivor
    assert 'File "' in survivor and "in _check_oldest" in survivor  # the threads' stacks
    assert took < 60
