"""Refusals before any cloud command runs: each names the bad value.

A launch that cannot run should cost a second on the laptop, not a queued request, an hour of
setup on 64 workers, or a pre-training stage that fails when the next stage starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

from codemix_jax import experiment, gin_config
from codemix_jax.job_shape import job_shape, stage_shapes
from codemix_jax.launch import source, zones
from codemix_jax.launch.job import BACKENDS, PROVISIONING, LaunchSpec

# TPU, queued-resource and GKE workload names: lowercase letters, digits and hyphens.
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")


def check_launch(
    spec: LaunchSpec, *, allow_unlisted_zone: bool = False, allow_dirty: bool = False
) -> LaunchSpec:
    """``spec`` with its commit and stage names, or ValueError naming what cannot run."""
    _check_options(spec)
    tpu = spec.tpu  # an unknown accelerator or size is refused here
    zones.check_zone(generation=spec.generation, zone=spec.zone, allow_unlisted=allow_unlisted_zone)
    if tpu.processes > 1 and not spec.job_root.startswith("gs://"):
        raise ValueError(
            f"{spec.accelerator} x {spec.num_slices} runs {tpu.processes} processes on "
            f"{tpu.processes} hosts: the run root {spec.job_root!r} must be a gs:// path every "
            "host reads and writes (and which outlives a preempted VM)"
        )
    stages = _check_job_shape(spec)
    commit = source.head_commit(allow_dirty=allow_dirty)
    source.check_committed(spec.all_gin_files, commit=commit)
    return dataclasses.replace(spec, commit=commit, stages=stages)


def _check_options(spec: LaunchSpec) -> None:
    if not _NAME.fullmatch(spec.name):
        raise ValueError(
            f"launch name {spec.name!r}: use lowercase letters, digits and hyphens, starting "
            "with a letter, at most 40 characters (it names the TPU VM or the workload)"
        )
    if spec.backend not in BACKENDS:
        raise ValueError(f"unknown backend {spec.backend!r}; one of {', '.join(BACKENDS)}")
    if spec.provisioning not in PROVISIONING:
        raise ValueError(f"unknown provisioning {spec.provisioning!r}; one of {PROVISIONING}")
    if bool(spec.run_dir) == bool(spec.root):
        raise ValueError("give --run_dir (codemix train) or --root (codemix experiment), not both")
    if spec.num_slices > 1 and spec.backend in ("tpu-vm", "skypilot"):
        raise ValueError(
            f"{spec.num_slices} slices: backend {spec.backend!r} makes one slice; multi-slice "
            "jobs use --backend queued or --backend xpk"
        )
    if spec.backend == "skypilot" and spec.provisioning == "reserved":
        raise ValueError("--backend skypilot launches spot or on-demand; reserved: tpu-vm, queued")
    if spec.backend == "xpk" and not (spec.cluster and spec.image):
        raise ValueError("--backend xpk needs --cluster (the team's GKE cluster) and --image")


def _check_job_shape(spec: LaunchSpec) -> tuple[str, ...]:
    """Lay the gin config on the slice (every stage of an experiment, or the one ``--stage``
    names, as `codemix experiment` plans it); return the arm's stage names."""
    if spec.run_dir:
        gin_config.parse(spec.all_gin_files, spec.all_gin_bindings)
        job_shape(accelerator=spec.accelerator, num_slices=spec.num_slices)
        return ()
    with tempfile.TemporaryDirectory() as scratch:
        plan = experiment.plan_experiment(
            gin_files=spec.all_gin_files,
            bindings=spec.all_gin_bindings,
            root=os.path.join(scratch, "root"),  # never created: nothing is read from gs://
            scale=spec.scale,
        )
    names = tuple(stage.name for stage in plan.stages)
    if spec.stage and spec.stage not in names:
        raise ValueError(f"no stage {spec.stage!r} in the arm; its stages: {', '.join(names)}")
    chosen = [stage for stage in plan.stages if spec.stage in (None, stage.name)]
    list(stage_shapes(chosen, accelerator=spec.accelerator, num_slices=spec.num_slices))
    return names
