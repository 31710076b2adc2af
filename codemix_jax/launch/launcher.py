"""The launch's life: create, status, logs, stop, delete, and watch (re-create after a preemption).

Every command goes through a runner (codemix_jax/launch/runner.py), so ``--dry_run`` prints the
same sequence a launch runs. TPU VMs and queued resources are driven here over ssh; xpk and
SkyPilot manage their jobs (and their recovery) themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable

from codemix_jax import run_dir
from codemix_jax.distributed import EXIT_JOB_BROKEN
from codemix_jax.launch import source, worker
from codemix_jax.launch.gcloud import QueuedResource, TpuVm
from codemix_jax.launch.job import LaunchSpec, record_path
from codemix_jax.launch.runner import LaunchFailed, Runner
from codemix_jax.launch.skypilot import SkyPilot
from codemix_jax.launch.xpk import Xpk
from codemix_jax.tpu_topology import TPU_PLATFORM_GIN
from codemix_jax.watchdog import EXIT_HUNG

# Exits that leave a broken job, not a failed one: rerunning resumes from the checkpoints.
BROKEN_JOB_EXITS = {f"exited {code}" for code in (EXIT_JOB_BROKEN, EXIT_HUNG)}

log = logging.getLogger(__name__)

Slice = TpuVm | QueuedResource
Sleep = Callable[[float], None]
NewestStep = Callable[[str], int | None]


def _slice(spec: LaunchSpec) -> Slice | None:
    return {"tpu-vm": TpuVm, "queued": QueuedResource}.get(spec.backend, lambda _: None)(spec)


def plan_notes(spec: LaunchSpec) -> list[str]:
    """What the launch is, in words, before its commands."""
    tpu = spec.tpu
    slices = f" x {spec.num_slices} slices" if spec.num_slices > 1 else ""
    platform = (
        f"{TPU_PLATFORM_GIN} appended (TPU kernels; --no_platform_gin leaves it out)"
        if spec.platform_gin
        else f"{TPU_PLATFORM_GIN} left out (--no_platform_gin)"
    )
    notes = [
        f"launch {spec.name}: {spec.accelerator}{slices} ({tpu.chips} chips, {tpu.processes} "
        f"processes) in {spec.zone}, {spec.provisioning}, backend {spec.backend}",
        f"commit {spec.commit}; run root {spec.job_root}; {platform}",
    ]
    if spec.stages:
        notes.append(f"stages: {', '.join(spec.stages)} (each checked on the slice)")
    if not spec.job_root.startswith("gs://"):
        notes.append(f"{spec.job_root} is on the VM's disk: a preemption or delete loses it")
    return notes


def create(spec: LaunchSpec, *, runner: Runner, launch_dir: str, sleep: Sleep = time.sleep) -> None:
    """Record the launch, ship its commit, make the slice (or workload), start the command."""
    for note in plan_notes(spec):
        runner.note(note)
    runner.write(record_path(launch_dir, spec.name), spec.to_json())
    runner.run(source.archive_argv(spec.commit))
    if spec.backend == "xpk":
        xpk = Xpk(spec)
        runner.note(xpk.cluster_note())
        for argv in xpk.build():
            runner.run(argv)
        runner.run(xpk.create())
    elif spec.backend == "skypilot":
        sky = SkyPilot(spec, launch_dir)
        runner.write(sky.task_path, sky.task_yaml())
        runner.run(sky.launch())
    else:
        tpu = _slice(spec)
        runner.run(tpu.create())
        _wait_ready(tpu, runner=runner, sleep=sleep)
        _setup_and_start(tpu, runner=runner)


def _wait_ready(tpu: Slice, *, runner: Runner, sleep: Sleep, poll_s: float = 30) -> None:
    if runner.dry_run:
        runner.note(f"then poll `{shlex.join(tpu.describe())}` until it prints {tpu.ready}")
        return
    seen = None
    while (state := _state(tpu, runner)) != tpu.ready:
        if state in tpu.lost:
            raise LaunchFailed(f"{tpu.spec.name} is {state} before it was ready")
        if state != seen:
            log.info("%s: %s; waiting for %s", tpu.spec.name, state, tpu.ready)
            seen = state
        sleep(poll_s)


def _setup_and_start(tpu: Slice, *, runner: Runner) -> None:
    """Put the commit on every worker, install it pinned, start the command on all at once."""
    runner.run(tpu.scp(source.archive_path(tpu.spec.commit), worker.ARCHIVE_SCP))
    runner.run(tpu.ssh(worker.SETUP))
    runner.run(tpu.ssh(worker.start(tpu.spec)))


def _state(tpu: Slice, runner: Runner) -> str:
    lines = runner.run(tpu.describe(), capture=True).split()
    return lines[-1] if lines else ""


def _worker_states(tpu: Slice, runner: Runner) -> list[str]:
    return worker.parse_status(runner.run(tpu.ssh(worker.STATUS), capture=True))


def status(spec: LaunchSpec, *, runner: Runner, launch_dir: str) -> str:
    """The slice's (or workload's) state and the command's, in a few lines."""
    lines = [*plan_notes(spec), f"restarts by watch (preemptions, broken jobs): {spec.restarts}"]
    if spec.backend == "xpk":
        xpk = Xpk(spec)
        runner.run(xpk.list_workload())
        restarts = runner.run(xpk.restarts(), capture=True).strip() or "0"
        return "\n".join([*lines, f"JobSet restarts (preemptions and failures): {restarts}"])
    if spec.backend == "skypilot":
        runner.run(SkyPilot(spec, launch_dir).queue())  # its RECOVERIES column: preemptions
        return "\n".join(lines)
    tpu = _slice(spec)
    state = _state(tpu, runner)
    lines.append(f"{spec.backend} {spec.name}: {state or 'unknown'}")
    if state == "WAITING_FOR_RESOURCES":
        lines.append("queued for capacity; `codemix launch delete` cancels the request")
    if state == tpu.ready:
        lines.append(f"command: {_summary(_worker_states(tpu, runner))}")
    return "\n".join(lines)


def _summary(states: list[str]) -> str:
    counts = {state: states.count(state) for state in sorted(set(states))}
    return ", ".join(f"{state} on {n}/{len(states)} workers" for state, n in counts.items())


def logs(
    spec: LaunchSpec, *, runner: Runner, launch_dir: str, worker_id: str, follow: bool
) -> None:
    """Tail the command's log on one worker (default 0) or all."""
    if spec.backend == "xpk":
        runner.run(Xpk(spec).logs(worker=worker_id, follow=follow))
    elif spec.backend == "skypilot":
        runner.run(SkyPilot(spec, launch_dir).logs(follow=follow))
    else:
        runner.run(_slice(spec).ssh(worker.tail(lines=100, follow=follow), worker=worker_id))


def stop(spec: LaunchSpec, *, runner: Runner, launch_dir: str) -> None:
    """Stop the command (it saves a checkpoint first); the slice stays, and costs, until delete."""
    if spec.backend == "xpk":
        runner.run(Xpk(spec).delete())
    elif spec.backend == "skypilot":
        runner.run(SkyPilot(spec, launch_dir).cancel())
    else:
        runner.run(_slice(spec).ssh(worker.STOP))


def delete(spec: LaunchSpec, *, runner: Runner, launch_dir: str) -> None:
    """Delete the slice, the queued request (also one still waiting) or the workload."""
    if spec.backend == "xpk":
        runner.run(Xpk(spec).delete())
    elif spec.backend == "skypilot":
        runner.run(SkyPilot(spec, launch_dir).cancel())
    else:
        runner.run(_slice(spec).delete())
    runner.remove(record_path(launch_dir, spec.name))


def watch(
    spec: LaunchSpec,
    *,
    runner: Runner,
    launch_dir: str,
    poll_s: float = 60,
    sleep: Sleep = time.sleep,
    newest_step: NewestStep = run_dir.latest_step,
) -> int:
    """Poll until the command ends; re-create a preempted slice and rerun the same command, and
    rerun a broken job's (exit 4 or 5) on the same slice: the rerun resumes from the newest
    checkpoints. Returns the command's exit status (0 when all exit 0)."""
    tpu = _slice(spec)
    if tpu is None:
        raise ValueError(
            f"backend {spec.backend!r} recovers by itself (xpk: JobSet restarts, SkyPilot: managed "
            "job recovery); `codemix launch status` shows its restarts"
        )
    ended_before = False
    while True:
        state = _state(tpu, runner)
        if state in tpu.lost:
            spec = _recreate(spec, state, runner=runner, launch_dir=launch_dir, sleep=sleep,
                             newest_step=newest_step)  # fmt: skip
            tpu, ended_before = _slice(spec), False
        elif state == tpu.ready:
            states = _worker_states(tpu, runner)
            if worker.RUNNING not in states:
                # An ending preemption also stops the command: believe the end one poll later.
                if not ended_before:
                    ended_before = True
                elif _broken(states) and spec.restarts < spec.max_restarts:
                    spec = _rerun(
                        spec, states, runner=runner, launch_dir=launch_dir, newest_step=newest_step
                    )
                    ended_before = False
                else:
                    return _ended(spec, states)
        sleep(poll_s)


def _recreate(
    spec: LaunchSpec,
    state: str,
    *,
    runner: Runner,
    launch_dir: str,
    sleep: Sleep,
    newest_step: NewestStep,
) -> LaunchSpec:
    log.warning("%s was preempted (state %s): deleting and re-creating it", spec.name, state)
    tpu = _slice(spec)
    runner.run(tpu.delete())
    runner.run(source.archive_argv(spec.commit))  # the archive may be gone from /tmp
    runner.run(tpu.create())
    _wait_ready(tpu, runner=runner, sleep=sleep)
    _setup_and_start(tpu, runner=runner)
    return _restarted(spec, runner=runner, launch_dir=launch_dir, newest_step=newest_step)


def _broken(states: list[str]) -> bool:
    """Some worker's command left a broken job: a process lost (exit 4) or a step hung (exit 5)."""
    return any(state in BROKEN_JOB_EXITS for state in states)


def _rerun(
    spec: LaunchSpec, states: list[str], *, runner: Runner, launch_dir: str, newest_step: NewestStep
) -> LaunchSpec:
    """Start the same command again on the same slice, which resumes from its checkpoints."""
    log.warning(
        "%s: the job broke (%s): starting it again (at most %d restarts)",
        *(spec.name, _summary(states), spec.max_restarts),
    )
    runner.run(_slice(spec).ssh(worker.start(spec)))
    return _restarted(spec, runner=runner, launch_dir=launch_dir, newest_step=newest_step)


def _restarted(
    spec: LaunchSpec, *, runner: Runner, launch_dir: str, newest_step: NewestStep
) -> LaunchSpec:
    """The restart counted in the launch record, and where the command resumes, logged."""
    spec = dataclasses.replace(spec, restarts=spec.restarts + 1)
    runner.write(record_path(launch_dir, spec.name), spec.to_json())
    log.warning(
        "%s restarted (restart %d): %s", spec.name, spec.restarts, _resume_point(spec, newest_step)
    )
    return spec


def _resume_point(spec: LaunchSpec, newest_step: NewestStep) -> str:
    """Which checkpoint the restarted command resumes from: the newest under the run root."""
    for path in reversed(spec.run_dirs):
        try:
            step = newest_step(path)
        except Exception as error:  # a root the launcher cannot read (credentials) still resumes
            return f"resumes from its newest checkpoint ({path} not readable here: {error})"
        if step is not None:
            return f"resumes from {path} at step {step}"
    return f"no checkpoint under {spec.job_root} yet: starts from step 0"


def _ended(spec: LaunchSpec, states: list[str]) -> int:
    if all(state == "exited 0" for state in states):
        log.info("%s: the command finished on every worker", spec.name)
        return 0
    log.error(
        "%s: the command ended (%s); not a preemption or a broken job, so not restarted: "
        "`codemix launch logs --name %s --worker all`", spec.name, _summary(states), spec.name
    )  # fmt: skip
    return 1
