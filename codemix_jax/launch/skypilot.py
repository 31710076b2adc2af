"""A SkyPilot managed job (`sky jobs launch`): after a spot preemption SkyPilot's controller
provisions a slice again and reruns the same setup and command, which resume from the newest
checkpoints under the gs:// root.

SkyPilot names a TPU ``tpu-<gcloud accelerator type>`` (``tpu-v5litepod-256``) and runs the task
on every host of a TPU pod slice; it makes one slice, so multi-slice jobs use queued resources
or xpk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex

from codemix_jax.launch import source, worker
from codemix_jax.launch.job import LaunchSpec


@dataclasses.dataclass(frozen=True)
class SkyPilot:
    spec: LaunchSpec
    launch_dir: str

    @property
    def task_path(self) -> str:
        return os.path.join(self.launch_dir, f"{self.spec.name}.sky.yaml")

    def task_yaml(self) -> str:
        """The task: the TPU, spot or not, the shipped commit, its pinned setup, the command."""
        spec = self.spec
        command = shlex.join(spec.codemix_argv(program=".venv/bin/codemix"))
        lines = [
            f"name: {spec.name}",
            "resources:",
            "  cloud: gcp",
            f"  zone: {spec.zone}",
            f"  accelerators: tpu-{spec.gcloud_accelerator}",
            "  accelerator_args:",
            f"    runtime_version: {spec.runtime}",
            "    tpu_vm: true",
            f"  use_spot: {json.dumps(spec.provisioning == 'spot')}",
            "  job_recovery:",
            "    strategy: FAILOVER",
            f"    max_restarts_on_errors: {spec.max_restarts}",
            "file_mounts:",
            f"  {worker.ARCHIVE}: {source.archive_path(spec.commit)}",
            "setup: |",
            f"  {worker.SETUP}",
            "run: |",
            f"  cd ~/codemix && {command}",
        ]
        return "\n".join(lines) + "\n"

    def launch(self) -> list[str]:
        return ["sky", "jobs", "launch", f"--name={self.spec.name}", "--yes", self.task_path]

    def queue(self) -> list[str]:
        """Managed jobs with their status and RECOVERIES (preemptions recovered)."""
        return ["sky", "jobs", "queue"]

    def logs(self, *, follow: bool) -> list[str]:
        return [
            "sky",
            "jobs",
            "logs",
            f"--name={self.spec.name}",
            *([] if follow else ["--no-follow"]),
        ]

    def cancel(self) -> list[str]:
        return ["sky", "jobs", "cancel", f"--name={self.spec.name}", "--yes"]
