"""A damaged newest checkpoint is set aside and the run resumes from the one before; with no good
checkpoint left it stops with exit 2 and one line. One straight 12-step run (checkpoints at 4, 8
and 12) is copied for each test and its step 12 damaged as a crash, a full disk or a bad copy
would."""

import asyncio
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from test_resume import STEPS, records, saved_state, train_args, train_cli

from codemix_jax.checkpoint import RestoreFailure, failure_returned


def state_file(step_dir: Path) -> Path:
    """The step's largest array file: most of the params and optimizer state."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=_size)


def _size(path: Path) -> int:
    return path.stat().st_size


def truncate(step_dir: Path) -> None:
    path = state_file(step_dir)
    path.write_bytes(path.read_bytes()[: _size(path) // 2])


def garble(step_dir: Path) -> None:
    """Inverts the first 64 bytes: the compressed chunk's header. (Bytes inverted in the middle
    of a chunk restore silently: nothing in orbax's format checksums the array data.)"""
    path = state_file(step_dir)
    data = path.read_bytes()
    path.write_bytes(bytes(255 - byte for byte in data[:64]) + data[64:])


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (truncate, "is not valid for value of size"),
    "garbled": (garble, "ZSTD_decompressStream() failed"),
    "no_data": (lambda step_dir: shutil.rmtree(step_dir / "data"), 'Item "data" was not found'),
    "no_meta": (lambda step_dir: shutil.rmtree(step_dir / "meta"), 'Item "meta" was not found'),
    "no_commit": (
        lambda step_dir: (step_dir / "_CHECKPOINT_METADATA").unlink(),
        "has no commit time in its _CHECKPOINT_METADATA",
    ),
}


@pytest.fixture(scope="module")
def straight_run(local_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    assert train_cli(local_data, run_dir) == 0
    return run_dir


def copy_of(straight_run: Path, tmp_path: Path) -> Path:
    """The straight run's checkpoints, without its metrics (so the resumed run's show alone)."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run / "checkpoints", run_dir / "checkpoints")
    return run_dir


def contents(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def set_aside(run_dir: Path) -> dict[str, Path]:
    """The run's damaged checkpoints by step, from their names ``<step>-<UTC time>``."""
    found = (run_dir / "checkpoints_damaged").iterdir()
    return {path.name.split("-")[0]: path for path in found}


def assert_ends_as_straight_run(run_dir: Path, straight_run: Path) -> None:
    final, expected = saved_state(run_dir, STEPS), saved_state(straight_run, STEPS)
    for actual, wanted in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(actual, wanted)


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_is_set_aside_and_the_run_resumes_from_the_one_before(
    local_data, straight_run, tmp_path, caplog, kind
):
    damage, reason = DAMAGE[kind]
    run_dir = copy_of(straight_run, tmp_path)
    damage(run_dir / "checkpoints" / "12")
    damaged = contents(run_dir / "checkpoints" / "12")

    with caplog.at_level(logging.INFO):
        assert train_cli(local_data, run_dir) == 0

    [warning] = [r.getMessage() for r in caplog.records if r.name == "codemix_jax.recovery"]
    assert warning.startswith("checkpoint at step 12 is damaged (") and "\n" not in warning
    assert reason in warning
    assert "resuming from the checkpoint at step 8" in caplog.text
    assert [record["step"] for record in records(run_dir)] == [9, 10, 11, 12]
    assert contents(set_aside(run_dir)["12"]) == damaged  # moved whole, byte for byte
    assert_ends_as_straight_run(run_dir, straight_run)


def test_a_damaged_checkpoint_is_reported_in_one_line_not_a_page(
    local_data, straight_run, tmp_path
):
    """`codemix train` as a user runs it: the reads a failed restore left in flight end in
    orbax's closed event loop, a traceback each, unless dropped (``_drop_abandoned_reads``)."""
    run_dir = copy_of(straight_run, tmp_path)
    for path in (run_dir / "checkpoints" / "12" / "state").rglob("d/*"):
        path.write_bytes(path.read_bytes()[:10])  # every array: many reads in flight
    command = [sys.executable, "-m", "codemix_jax", *train_args(local_data, run_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint at step 12 is damaged (" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_read_reporting_back_before_the_restore_fails_is_dropped_too(monkeypatch, capsys):
    """The race behind the test above: orbax's loop closes inside the restore, and an abandoned
    read can report back to it before the failure reaches ``failure_returned``."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    closed_loop = asyncio.new_event_loop()
    closed_loop.close()

    class AbandonedRead:
        def __del__(self) -> None:
            closed_loop.call_soon_threadsafe(print)  # RuntimeError: Event loop is closed

    def restore(handler: object, directory: Path) -> None:
        AbandonedRead()  # reports back (unraisable) at once, while the restore still runs
        raise ValueError("damaged")

    failure = failure_returned(restore)(None, Path("step"))

    assert isinstance(failure, RestoreFailure) and str(failure.error) == "damaged"
    assert capsys.readouterr().err == ""


def test_keep_policy_removes_the_good_checkpoint_only_for_a_newer_good_one(
    local_data, straight_run, tmp_path
):
    """keep=1 after setting step 12 aside: step 8 resumes, the new step 12 replaces it."""
    run_dir = copy_of(straight_run, tmp_path)
    truncate(run_dir / "checkpoints" / "12")
    assert train_cli(local_data, run_dir, "train.keep_checkpoints = 1") == 0

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["12"]
    assert list(set_aside(run_dir)) == ["12"]
    assert_ends_as_straight_run(run_dir, straight_run)


def test_a_save_killed_midway_is_not_a_checkpoint(local_data, straight_run, tmp_path, caplog):
    """Orbax writes a step under ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when done:
    a run killed before the rename leaves that directory, which orbax neither resumes nor
    deletes (cleanup_tmp_directories is off)."""
    run_dir = copy_of(straight_run, tmp_path)
    unfinished = run_dir / "checkpoints" / "12.orbax-checkpoint-tmp-1795628294"
    (run_dir / "checkpoints" / "12").rename(unfinished)

    with caplog.at_level(logging.INFO):
        assert train_cli(local_data, run_dir) == 0

    assert "resuming from the checkpoint at step 8" in caplog.text
    # (Not caplog.text: an earlier test's leftover orbax task may log its tmp path, "damaged_...")
    assert not [r for r in caplog.records if r.name.startswith("codemix") and "damaged" in r.msg]
    assert [record["step"] for record in records(run_dir)] == [9, 10, 11, 12]
    assert unfinished.is_dir()


def test_no_good_checkpoint_stops_with_exit_2_and_one_line(
    local_data, straight_run, tmp_path, caplog
):
    run_dir = copy_of(straight_run, tmp_path)
    for step, kind in ((4, "no_data"), (8, "garbled"), (12, "truncated")):
        DAMAGE[kind][0](run_dir / "checkpoints" / str(step))

    with caplog.at_level(logging.ERROR):
        assert train_cli(local_data, run_dir) == 2

    [error] = [r.getMessage() for r in caplog.records if r.name == "codemix"]
    assert error.startswith("no checkpoint of this run restores (step 12: ") and "\n" not in error
    for step, kind in ((4, "no_data"), (8, "garbled"), (12, "truncated")):
        assert f"step {step}: " in error and DAMAGE[kind][1] in error
    assert not any((run_dir / "checkpoints").iterdir())
    assert sorted(set_aside(run_dir)) == ["12", "4", "8"]
    assert not (run_dir / "metrics.jsonl").exists()  # never started afresh


def test_a_checkpoint_of_another_process_count_is_refused_not_set_aside(
    local_data, straight_run, tmp_path, caplog
):
    """Input positions as two processes write them: another run's layout, not damage."""
    run_dir = copy_of(straight_run, tmp_path)
    data = run_dir / "checkpoints" / "12" / "data"
    (data / "process_0-of-1").rename(data / "process_0-of-2")
    shutil.copytree(data / "process_0-of-2", data / "process_1-of-2")

    with caplog.at_level(logging.ERROR):
        assert train_cli(local_data, run_dir) == 2

    assert "written by another number of processes than this run's 1" in caplog.text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["12", "4", "8"]
    assert not (run_dir / "checkpoints_damaged").exists()
