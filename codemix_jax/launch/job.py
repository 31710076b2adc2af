"""What one launch is: the slice, the backend, the `codemix` command its workers run, and the
record that lets later subcommands (status, logs, stop, delete, watch) need only its name."""

from __future__ import annotations

import dataclasses
import json
import os

from codemix_jax.tpu_topology import TPU_PLATFORM_GIN, TpuSlice, tpu_slice

BACKENDS = ("tpu-vm", "queued", "xpk", "skypilot")
PROVISIONING = ("on-demand", "spot", "reserved")
DEFAULT_LAUNCH_DIR = "~/.codemix/launches"

# gcloud names a v5e slice ``v5litepod-N``; the other generations keep codemix's name.
_GCLOUD_GENERATION = {"v5e": "v5litepod"}
# The TPU VM software each generation boots (Cloud TPU docs); ``--runtime_version`` overrides.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One launch. ``run_dir`` makes it `codemix train`, ``root`` `codemix experiment`."""

    name: str
    backend: str
    accelerator: str
    zone: str
    gin_files: tuple[str, ...]
    gin_bindings: tuple[str, ...] = ()
    num_slices: int = 1
    provisioning: str = "on-demand"
    project: str | None = None  # gcloud's configured project if None
    run_dir: str | None = None
    root: str | None = None
    scale: str = "full"
    stage: str | None = None
    platform_gin: bool = True
    runtime_version: str | None = None
    cluster: str | None = None  # xpk: the team's GKE cluster
    image: str | None = None  # xpk: image repository; the tag is the commit
    max_restarts: int = 10  # restarts after a failure (xpk, SkyPilot) or a broken job (watch)
    commit: str = ""
    stages: tuple[str, ...] = ()  # an experiment's stage folders, to say where a resume starts
    restarts: int = 0  # counted by `watch`: re-creations after a preemption, broken-job reruns

    @property
    def tpu(self) -> TpuSlice:
        return tpu_slice(self.accelerator, num_slices=self.num_slices)

    @property
    def generation(self) -> str:
        return self.accelerator.split("-")[0]

    @property
    def gcloud_accelerator(self) -> str:
        size = self.accelerator.split("-")[1]
        return f"{_GCLOUD_GENERATION.get(self.generation, self.generation)}-{size}"

    @property
    def runtime(self) -> str:
        return self.runtime_version or RUNTIME_VERSIONS[self.generation]

    @property
    def job_root(self) -> str:
        return self.run_dir or self.root or ""

    @property
    def run_dirs(self) -> list[str]:
        """Where checkpoints land: the run dir, or each stage's folder under the root in order."""
        if self.run_dir:
            return [self.run_dir]
        return [f"{self.job_root.rstrip('/')}/{stage}" for stage in self.stages]

    @property
    def all_gin_files(self) -> tuple[str, ...]:
        return (*self.gin_files, TPU_PLATFORM_GIN) if self.platform_gin else self.gin_files

    @property
    def all_gin_bindings(self) -> tuple[str, ...]:
        """The user's bindings, then the slices over DCN (as `codemix aot --num_slices` binds)."""
        slices = (f"make_mesh.dcn_data = {self.num_slices}",) if self.num_slices > 1 else ()
        return (*self.gin_bindings, *slices)

    def codemix_argv(self, *, program: str = "codemix") -> list[str]:
        """The command every worker runs; rerunning it resumes from the newest checkpoints."""
        argv = [program, "train" if self.run_dir else "experiment"]
        argv += [arg for path in self.all_gin_files for arg in ("--gin_file", path)]
        argv += [arg for binding in self.all_gin_bindings for arg in ("--gin_bindings", binding)]
        if self.run_dir:
            argv += ["--run_dir", self.run_dir]
        else:
            argv += ["--root", self.job_root]
            argv += ["--scale", self.scale] if self.scale != "full" else []
            argv += ["--stage", self.stage] if self.stage else []
        return [*argv, "--distributed"] if self.tpu.processes > 1 else argv

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LaunchSpec:
        fields = json.loads(text)
        tuples = {key: tuple(value) for key, value in fields.items() if isinstance(value, list)}
        return cls(**{**fields, **tuples})


def record_path(launch_dir: str, name: str) -> str:
    return os.path.join(os.path.expanduser(launch_dir), f"{name}.json")


def load_record(launch_dir: str, name: str) -> LaunchSpec:
    path = record_path(launch_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no launch named {name!r}: {path} does not exist")
    with open(path) as f:
        return LaunchSpec.from_json(f.read())
