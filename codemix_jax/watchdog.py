"""A watch on how long each train step takes on the devices.

On a pod, a step that takes far longer than usual is the first sign of trouble (a slow host, a
stalled input, a peer stuck in a collective), and a step that never finishes burns the whole
slice's hours. The watch names the first and ends the process on the second, so the job's manager
can restart it (the rerun resumes from the newest checkpoint).

A step's time runs from when it could start (dispatched, and the step before it done) to when its
outputs are ready: host work between steps (logging, validation, saving) is not in it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import logging
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gin
import jax

from codemix_jax.distributed import exit_now

log = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_HUNG = 5  # a step did not finish within StepWatchdog.exit_after_s


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StepWatchdog:
    """When a step counts as slow, and when as hung.

    slow_factor: a step this many times the median of the newest ``window`` steps is named in a
      warning (once while it runs, and with its time when it ends); 0 = never.
    exit_after_s: a step not finished this long after it could start ends the process with exit
      code 5 and every thread's stack on stderr; 0 = never. Compilation is not part of a step.
    min_steps: steps timed before the median is trusted.
    """

    slow_factor: float = 10.0
    exit_after_s: float = 900.0
    window: int = 100
    min_steps: int = 5
    check_every_s: float = 0.5

    def __post_init__(self) -> None:
        if self.slow_factor < 0 or self.exit_after_s < 0 or self.window < self.min_steps:
            raise ValueError(f"bad StepWatchdog settings: {self}")

    @contextlib.contextmanager
    def watching(self, *, on_hang: Callable[[str], None] | None = None) -> Iterator[StepTimes]:
        """Time steps until the block ends; ``on_hang`` (default: exit 5) gets the message."""
        times = StepTimes(self, on_hang=on_hang or _exit_hung)
        try:
            yield times
        finally:
            times.stop()


class StepTimes:
    """Two threads: one waits for each step's outputs in order; one checks the oldest unfinished
    step. A step counts from its call, since a backend that runs steps synchronously (CPU) or a
    blocked collective may keep the call itself from returning."""

    def __init__(self, policy: StepWatchdog, *, on_hang: Callable[[str], None]):
        self._policy = policy
        self._on_hang = on_hang
        self._outputs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._durations: collections.deque[float] = collections.deque(maxlen=policy.window)
        self._called: dict[int, float] = {}  # unfinished steps -> when their call began
        self._last_done = time.monotonic()
        self._warned: int | None = None
        self._first_call = True  # it compiles: not timed
        self._stopped = threading.Event()
        for target in (self._wait_for_steps, self._check_oldest):
            threading.Thread(target=target, name=f"watchdog{target.__name__}", daemon=True).start()

    def run(self, step: int, step_fn: Callable[..., T], *args: Any) -> T:
        """``step_fn(*args)``, timed as step ``step`` until its outputs are ready. The first call
        compiles (minutes at scale), so the first step is not timed."""
        timed, self._first_call = not self._first_call, False
        if timed:
            with self._lock:
                self._called[step] = time.monotonic()
        outputs = step_fn(*args)
        # The last leaf: a metric of (state, metrics), never donated to the next step as state is.
        self._outputs.put((step, timed, jax.tree.leaves(outputs)[-1]))
        return outputs

    def median(self) -> float | None:
        with self._lock:
            if len(self._durations) < self._policy.min_steps:
                return None
            return statistics.median(self._durations)

    def stop(self) -> None:
        self._stopped.set()
        self._outputs.put(None)

    def _wait_for_steps(self) -> None:
        while (item := self._outputs.get()) is not None:
            step, timed, output = item
            try:
                output.block_until_ready()
            except jax.errors.JaxRuntimeError:
                return  # the step failed: the training thread meets the same error and reports it
            now, median = time.monotonic(), self.median()  # the median before this step joins
            with self._lock:
                if timed:
                    took = now - self._started(step)
                    del self._called[step]
                    self._durations.append(took)
                self._last_done = now
            if timed and self._far_slower(took, median):
                log.warning(
                    "step %d took %.1f s, %.0fx the median step (%.3f s)",
                    *(step, took, took / median, median),
                )

    def _started(self, step: int) -> float:
        """When ``step`` could start: called, and the step before it done (hold the lock)."""
        return max(self._called[step], self._last_done)

    def _check_oldest(self) -> None:
        while not self._stopped.wait(self._policy.check_every_s):
            with self._lock:
                if not self._called:
                    continue
                step = min(self._called)
                elapsed = time.monotonic() - self._started(step)
            self._check(step, elapsed)
            if self._policy.exit_after_s and elapsed > self._policy.exit_after_s:
                self._on_hang(
                    f"step {step} has not finished after {elapsed:.0f} s (StepWatchdog."
                    f"exit_after_s = {self._policy.exit_after_s:g}; median step "
                    f"{self.median() or float('nan'):.3f} s)"
                )
                return

    def _far_slower(self, seconds: float, median: float | None) -> bool:
        factor = self._policy.slow_factor
        return bool(factor and median and seconds > factor * median)

    def _check(self, step: int, elapsed: float) -> None:
        """Name a running step once it is far slower than the median."""
        median = self.median()
        if self._far_slower(elapsed, median) and self._warned != step:
            self._warned = step
            log.warning(
                "step %d has been running for %.1f s, %.0fx the median step (%.3f s): a slow "
                "host, or a process stuck or dead?",
                *(step, elapsed, elapsed / median, median),
            )


def _exit_hung(message: str) -> None:
    log.error(
        "%s: the job is hung (a process stuck or dead?). Every thread's stack follows; exiting "
        "with code %d so that the job can be restarted (it resumes from its newest checkpoint).",
        message,
        EXIT_HUNG,
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    exit_now(EXIT_HUNG)
