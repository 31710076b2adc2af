"""Start-up noise of the native libraries under ``codemix``, kept off the terminal.

TensorFlow (here only tf.data), tf_text's SentencePiece and libtpu log from C++ straight to file
descriptor 2, below Python's logging, and TF logs before ``TF_CPP_MIN_LOG_LEVEL`` applies (absl
prints everything until it is initialised). So the ``codemix`` entry point calls ``quiet()``
before anything imports TF or JAX: no env var reaches all of it, a filter on fd 2 does.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import signal
import subprocess
import sys
from typing import BinaryIO

# Device nodes of the accelerators JAX drives: TPU (v2-v4 /dev/accel*, v5e and later /dev/vfio),
# NVIDIA (/dev/dxg under WSL2) and AMD GPUs.
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/dxg", "/dev/kfd")

# Lines dropped from fd 2: notices that say nothing about the run.
NOISE = (
    # absl (C++) in TF and tf_text, once per library, before its first message.
    b"All log messages before absl::InitializeLog() is called are written to STDERR",
    # TF looks for CUDA at import and at its first op; it only feeds data, JAX drives any GPU.
    b"Could not find cuda drivers on your machine",
    b"failed call to cuInit",
    # TF's oneDNN notice is about the round-off of its math kernels, which tf.data does not use.
    b"oneDNN custom operations are on",
    # tf_text's SentencePiece, once per tokenizer op: the identity normalization is the vocab's
    # own choice (data/vocab.py).
    b"precompiled_charsmap is empty. use identity normalization.",
)


def quiet() -> None:
    """Skip the TPU probe on a host without accelerators, and drop NOISE lines from fd 2."""
    if not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES):
        # Otherwise JAX probes for a TPU through libtpu (installed for `codemix aot`, which still
        # loads it), and libtpu logs errors about the TPU metadata it cannot find. An explicit
        # JAX_PLATFORMS, and any TPU or GPU host, keep JAX's own choice.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _filter_stderr()


def _filter_stderr() -> None:
    """Route fd 2 through a child process that passes on every line but NOISE.

    A child, not a thread: if a native library aborts this process, the child still passes on
    what was written before, the fatal message included. It ends when the pipe closes, at exit,
    and no signal should end it sooner: Ctrl-C or a preemption's SIGTERM to the process group
    is for this process, which then logs how it stops. So the child has a group of its own (and
    ignores SIGINT and SIGTERM, for a SIGTERM sent to every process).
    """
    sys.stderr.flush()
    child = subprocess.Popen(
        [sys.executable, "-m", __name__], stdin=subprocess.PIPE, process_group=0
    )
    terminal = os.dup(2)
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()
    atexit.register(_close_filter, child, terminal)


def _close_filter(child: subprocess.Popen, terminal: int) -> None:
    """Put fd 2 back, which closes the pipe, and let the child write its last lines."""
    sys.stderr.flush()
    os.dup2(terminal, 2)
    with contextlib.suppress(subprocess.TimeoutExpired):  # a subprocess may hold the pipe open
        child.wait(timeout=10)


def pass_on(source: int, sink: BinaryIO) -> None:
    """Copy ``source`` to ``sink`` but NOISE lines. An unfinished line's text up to its last
    carriage return goes at once: that is a progress bar (tqdm), never noise."""
    pending = b""
    while chunk := os.read(source, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        bar, carriage_return, pending = pending.rpartition(b"\r")
        sink.write(b"".join(line + b"\n" for line in lines if not _is_noise(line)))
        sink.write(bar + carriage_return)
        sink.flush()
    if not _is_noise(pending):
        sink.write(pending)
        sink.flush()


def _is_noise(line: bytes) -> bool:
    return any(noise in line for noise in NOISE)


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    pass_on(sys.stdin.fileno(), sys.stderr.buffer)
