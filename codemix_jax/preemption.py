"""Stopping cleanly when asked: SIGTERM (TPU maintenance, a spot reclaim) or SIGINT (Ctrl-C).

The loop asks ``reached(step)`` after every step. When it says yes, every process is at that same
step: the loop saves a checkpoint there and raises ``Preempted``, which the CLI turns into exit 0
(a rerun resumes from that checkpoint). A second signal while the save runs stops at once.

One process watches its own signals. Several agree through JAX's preemption service: it catches
SIGTERM on any process, tells the others, and names the first step that every process can still
reach (``multihost_utils.reached_preemption_sync_point``). SIGINT is passed on to it as SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run saved a checkpoint at ``step`` and stopped because it was asked to."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(
            f"stopped by {signal_name} after step {step}: checkpoint saved; rerun the same "
            "command to resume from it"
        )
        self.step = step


class Preemption:
    """Signals received so far, and whether this step is the one to stop at."""

    def __init__(self, caught: tuple[signal.Signals, ...]) -> None:
        self.caught = caught
        self.signal_name = ""

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self.signal_name)

    def stopped(self, step: int) -> Preempted:
        return Preempted(step, self.signal_name or "a preemption notice")

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again to "
            "stop at once)",
            self.signal_name,
        )
        for caught in self.caught:  # a second signal gets the default: stop now
            signal.signal(caught, signal.SIG_DFL)
        if signal.SIGTERM not in self.caught:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service listens for SIGTERM


@contextlib.contextmanager
def watching_signals() -> Iterator[Preemption]:
    """Catch the stop signals for the duration, then restore the previous handlers.

    With several processes SIGTERM belongs to JAX's preemption service (installed by
    ``jax.distributed.initialize``), so only SIGINT is caught. Off the main thread (where Python
    cannot catch signals) nothing is caught and only the preemption service can stop the run.
    """
    caught = STOP_SIGNALS if jax.process_count() == 1 else (signal.SIGINT,)
    if threading.current_thread() is not threading.main_thread():
        caught = ()
    preemption = Preemption(caught)
    previous = {signum: signal.signal(signum, preemption._on_signal) for signum in caught}
    try:
        yield preemption
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
