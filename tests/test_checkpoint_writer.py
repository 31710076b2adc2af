"""The checkpoint writer yields the CPUs to training (SCHED_IDLE), except while training waits for
it: then it runs at normal priority, or a run's last save (and the save at a SIGTERM stop, inside
the grace period) waits for CPUs that a busy host never leaves idle."""

import os
import threading

from codemix_jax.checkpoint import Checkpoints


def test_the_writer_runs_at_normal_priority_only_while_it_is_waited_for(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    checkpoints = Checkpoints(str(tmp_path / "checkpoints"), save_every=1, keep=1)
    policies: dict[str, int] = {}
    started, release = threading.Event(), threading.Event()

    def a_save() -> None:  # stands in for orbax's write, on the writer thread
        policies["before"] = os.sched_getscheduler(0)
        started.set()
        release.wait(10)
        policies["while waited for"] = os.sched_getscheduler(0)

    with checkpoints:
        checkpoints._writing = checkpoints._writer.submit(a_save)
        assert started.wait(10)
        threading.Timer(0.5, release.set).start()  # by then wait() below is waiting
        checkpoints.wait()
        after = checkpoints._writer.submit(os.sched_getscheduler, 0).result()

    assert policies == {"before": os.SCHED_IDLE, "while waited for": os.SCHED_OTHER}
    assert after == os.SCHED_IDLE  # idle again once nobody waits
