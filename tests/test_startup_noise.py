"""The filter on the `codemix` process's stderr: noise goes, everything else passes, even when
the process dies of a native abort."""

import io
import os
import signal
import subprocess
import sys
import threading
import time

from codemix_jax.startup_noise import pass_on

CUDA_NOTICE = b"I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will..."


def filtered(written: bytes) -> bytes:
    read_end, write_end = os.pipe()
    os.write(write_end, written)
    os.close(write_end)
    sink = io.BytesIO()
    pass_on(read_end, sink)
    os.close(read_end)
    return sink.getvalue()


def test_noise_lines_go_and_the_rest_passes_as_written():
    written = b"one\n" + CUDA_NOTICE + b"\nbar 1/2\rbar 2/2\rlast, unfinished"
    assert filtered(written) == b"one\nbar 1/2\rbar 2/2\rlast, unfinished"


def test_a_progress_bar_passes_before_its_line_ends():
    """tqdm redraws its line after a carriage return; waiting for the newline would hide it."""
    read_end, write_end = os.pipe()
    sink = io.BytesIO()
    reader = threading.Thread(target=pass_on, args=(read_end, sink))
    reader.start()
    os.write(write_end, b"ingest: 1/2 files\r")
    deadline = time.monotonic() + 10
    while not sink.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    shown = sink.getvalue()
    os.close(write_end)
    reader.join()
    os.close(read_end)
    assert shown == b"ingest: 1/2 files\r"


def test_last_words_of_an_aborted_process_get_through(tmp_path):
    """The filter is a child process: it outlives the parent's abort and passes on its message."""
    code = (
        "import os; from codemix_jax import startup_noise; startup_noise.quiet(); "
        f"os.write(2, {CUDA_NOTICE!r} + b'\\nF0000 check failed: the fatal message\\n'); "
        "os.abort()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr == b"F0000 check failed: the fatal message\n"


def test_last_words_after_a_sigterm_to_the_process_group_get_through(tmp_path):
    """A preemption's SIGTERM reaches every process of the group; the run then saves and logs
    how it stopped, which must not meet a filter that is gone (lost lines, a broken pipe)."""
    # SIGTERM is blocked before 'ready' and taken by sigwait: with a handler and pause(), a
    # signal arriving between the two would leave pause() waiting forever.
    code = (
        "import signal, sys; from codemix_jax import startup_noise; startup_noise.quiet(); "
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); print('ready', flush=True); "
        "signal.sigwait({signal.SIGTERM}); print('saved step 7; stopping', file=sys.stderr)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,
    )
    assert process.stdout.readline() == b"ready\n"
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (0, b"saved step 7; stopping\n")
