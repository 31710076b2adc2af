"""TPU slices made by gcloud: a TPU VM (`gcloud compute tpus tpu-vm`) or a queued resource
(`gcloud compute tpus queued-resources`), which waits for capacity and is the only way to get
several slices joined over DCN.

Each class composes the commands; `codemix_jax/launch/launcher.py` runs them in order.
"""

from __future__ import annotations

import dataclasses

from codemix_jax.launch.job import LaunchSpec

_TPUS = ("gcloud", "compute", "tpus")
_PROVISIONING_FLAGS = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}


def _where(spec: LaunchSpec) -> list[str]:
    return [f"--zone={spec.zone}", *([f"--project={spec.project}"] if spec.project else [])]


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """One slice, created at once (or refused for lack of capacity); spot VMs are PREEMPTED."""

    spec: LaunchSpec
    ready = "READY"
    lost = ("PREEMPTED", "TERMINATED", "STOPPED")  # only deleting and re-creating helps
    waiting = ("CREATING",)

    def _tpu_vm(self, verb: str, *args: str) -> list[str]:
        return [*_TPUS, "tpu-vm", verb, *args, *_where(self.spec)]

    def create(self) -> list[str]:
        return self._tpu_vm(
            "create",
            self.spec.name,
            f"--accelerator-type={self.spec.gcloud_accelerator}",
            f"--version={self.spec.runtime}",
            *_PROVISIONING_FLAGS[self.spec.provisioning],
        )

    def describe(self) -> list[str]:
        return self._tpu_vm("describe", self.spec.name, "--format=value(state)")

    def delete(self) -> list[str]:
        return self._tpu_vm("delete", self.spec.name, "--quiet")

    def scp(self, local: str, remote: str) -> list[str]:
        return self._tpu_vm("scp", local, f"{self.spec.name}:{remote}", "--worker=all", "--quiet")

    def ssh(self, command: str, *, worker: str = "all") -> list[str]:
        return self._tpu_vm(
            "ssh", self.spec.name, f"--worker={worker}", f"--command={command}", "--quiet"
        )


@dataclasses.dataclass(frozen=True)
class QueuedResource:
    """A request that waits for capacity, then makes one slice (``--node-id``) or several
    (``--node-count``, nodes NAME-0, NAME-1, ...); a preempted spot request is SUSPENDED."""

    spec: LaunchSpec
    ready = "ACTIVE"
    lost = ("SUSPENDING", "SUSPENDED", "FAILED")
    waiting = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")

    def _queued(self, verb: str, *args: str) -> list[str]:
        return [*_TPUS, "queued-resources", verb, *args, *_where(self.spec)]

    def create(self) -> list[str]:
        spec = self.spec
        if spec.num_slices > 1:
            nodes = [f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
        else:
            nodes = [f"--node-id={spec.name}"]
        return self._queued(
            "create",
            spec.name,
            f"--accelerator-type={spec.gcloud_accelerator}",
            f"--runtime-version={spec.runtime}",
            *nodes,
            *_PROVISIONING_FLAGS[spec.provisioning],
        )

    def describe(self) -> list[str]:
        return self._queued("describe", self.spec.name, "--format=value(state.state)")

    def delete(self) -> list[str]:
        """``--force`` deletes the request in any state: still waiting, active with its nodes."""
        return self._queued("delete", self.spec.name, "--force", "--quiet")

    def scp(self, local: str, remote: str) -> list[str]:
        return self._queued(
            "scp", local, f"{self.spec.name}:{remote}", "--node=all", "--worker=all", "--quiet"
        )

    def ssh(self, command: str, *, worker: str = "all") -> list[str]:
        node = "all" if worker == "all" else "0"
        return self._queued(
            "ssh",
            self.spec.name,
            f"--node={node}",
            f"--worker={worker}",
            f"--command={command}",
            "--quiet",
        )
