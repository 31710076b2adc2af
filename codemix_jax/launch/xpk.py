"""A JobSet workload on the team's GKE TPU cluster, by xpk.

The cluster (its slices, and whether they are spot, on-demand or reserved) is the team's, made
once with `xpk cluster create`; a launch only builds the image of its commit and creates the
workload. After a preemption or a failure, JobSet restarts every pod (``--max-restarts`` times),
and the same command resumes from the newest checkpoints under the gs:// root.
"""

from __future__ import annotations

import dataclasses
import shlex

from codemix_jax.launch import source
from codemix_jax.launch.job import LaunchSpec

_CAPACITY_FLAGS = {
    "on-demand": "--on-demand",
    "spot": "--spot",
    "reserved": "--reservation=RESERVATION",
}


@dataclasses.dataclass(frozen=True)
class Xpk:
    spec: LaunchSpec

    @property
    def image(self) -> str:
        return f"{self.spec.image}:{self.spec.commit[:12]}"

    def _where(self) -> list[str]:
        spec = self.spec
        return [
            f"--cluster={spec.cluster}",
            f"--zone={spec.zone}",
            *([f"--project={spec.project}"] if spec.project else []),
        ]

    def cluster_note(self) -> str:
        spec = self.spec
        return (
            f"the cluster is the team's: xpk cluster create --cluster={spec.cluster} "
            f"--tpu-type={spec.gcloud_accelerator} --num-slices={spec.num_slices} "
            f"{_CAPACITY_FLAGS[spec.provisioning]} made its {spec.provisioning} slices"
        )

    def build(self) -> list[list[str]]:
        """The image of the recorded commit: unpack its archive, build launch/Dockerfile, push."""
        context = source.archive_path(self.spec.commit).removesuffix(".tar.gz")
        return [
            ["mkdir", "-p", context],
            ["tar", "-xzf", source.archive_path(self.spec.commit), "-C", context],
            ["docker", "build", "-f", f"{context}/launch/Dockerfile", "-t", self.image, context],
            ["docker", "push", self.image],
        ]

    def create(self) -> list[str]:
        spec = self.spec
        return [
            "xpk",
            "workload",
            "create",
            f"--workload={spec.name}",
            *self._where(),
            f"--tpu-type={spec.gcloud_accelerator}",
            f"--num-slices={spec.num_slices}",
            f"--docker-image={self.image}",
            f"--command={shlex.join(spec.codemix_argv())}",
            f"--max-restarts={spec.max_restarts}",
        ]

    def list_workload(self) -> list[str]:
        return ["xpk", "workload", "list", *self._where(), f"--filter-by-job={self.spec.name}"]

    def restarts(self) -> list[str]:
        """JobSet counts its restarts (preemptions included)."""
        return ["kubectl", "get", "jobset", self.spec.name, "-o", "jsonpath={.status.restarts}"]

    def logs(self, *, worker: str, follow: bool) -> list[str]:
        selector = f"jobset.sigs.k8s.io/jobset-name={self.spec.name}"
        if worker != "all":  # the pod of process `worker` in the first slice
            selector += (
                f",jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index={worker}"
            )
        many = (
            [f"--max-log-requests={self.spec.tpu.processes}", "--prefix"] if worker == "all" else []
        )
        return [
            "kubectl",
            "logs",
            f"--selector={selector}",
            *many,
            *(["--follow"] if follow else []),
        ]

    def delete(self) -> list[str]:
        return ["xpk", "workload", "delete", f"--workload={self.spec.name}", *self._where()]
