"""`codemix launch`: the composed gcloud/xpk/SkyPilot commands, the refusals before any command,
the preemption loop, and the dry run. No cloud here: a scripted runner stands in for the shell."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex

import pytest

from codemix_jax import cli
from codemix_jax.launch import checks, commands, launcher, runner, source
from codemix_jax.launch.job import LaunchSpec, load_record, record_path
from codemix_jax.launch.skypilot import SkyPilot

ARM = "gin/experiments/paper_a/balanced_cooldown.gin"  # batch 512: one row per chip of 512
ROOT = "gs://bucket/runs/balanced-cooldown"


class Scripted:
    """Records every command and file; answers captured commands from scripted replies, keyed
    by a piece of the command (the last reply repeats)."""

    dry_run = False

    def __init__(self, replies: dict[str, list[str]] | None = None) -> None:
        self.replies = {key: list(values) for key, values in (replies or {}).items()}
        self.commands: list[list[str]] = []
        self.files: dict[str, str] = {}
        self.removed: list[str] = []

    def run(self, argv, *, capture=False) -> str:
        self.commands.append(list(argv))
        text = shlex.join(argv)
        for key, values in self.replies.items():
            if key in text:
                return values.pop(0) if len(values) > 1 else values[0]
        return ""

    def write(self, path, text) -> None:
        self.files[path] = text

    def remove(self, path) -> None:
        self.removed.append(path)

    def note(self, text) -> None:
        pass

    def find(self, *pieces: str) -> list[list[str]]:
        """The commands that contain every piece (as argv items or inside one)."""
        return [argv for argv in self.commands if all(p in shlex.join(argv) for p in pieces)]


class Refusing(Scripted):
    """Fails at the first command, so a launch that should have been refused cannot go on."""

    def run(self, argv, *, capture=False) -> str:
        super().run(argv)
        raise runner.LaunchFailed(f"ran {shlex.join(argv)}")


def spec(**overrides) -> LaunchSpec:
    fields = dict(
        name="balanced",
        backend="queued",
        accelerator="v5e-256",
        zone="us-west4-a",
        project="my-proj",
        provisioning="spot",
        gin_files=(ARM,),
        root=ROOT,
    )
    return checks.check_launch(LaunchSpec(**{**fields, **overrides}), allow_dirty=True)


def all_workers(reply: str) -> str:
    """What the status command prints over ssh from the 64 workers of a v5e-256."""
    return "\n".join([reply] * 64)


def test_v5e_256_single_slice_spot_queued_resource(tmp_path):
    launch = spec()
    fake = Scripted({"describe": ["ACTIVE"]})
    launcher.create(launch, runner=fake, launch_dir=str(tmp_path), sleep=lambda s: None)

    assert launch.tpu.processes == 64 and launch.stages == ("pretrain", "cooldown")
    assert launch.commit == source.head_commit(allow_dirty=True)
    (create,) = fake.find("queued-resources", "create")
    wanted = ["--accelerator-type=v5litepod-256", "--zone=us-west4-a", "--project=my-proj"]
    wanted += ["--spot", "--node-id=balanced", "--runtime-version=v2-alpha-tpuv5-lite"]
    assert set(wanted) <= set(create)
    assert fake.find("git", "archive", launch.commit)
    assert fake.find("queued-resources", "scp", "--node=all", "--worker=all")
    (start,) = fake.find("queued-resources", "ssh", "--worker=all", "worker_start.sh")
    command = next(arg for arg in start if arg.startswith("--command="))
    argv = shlex.split(command.removeprefix("--command="))[2:]
    assert argv == [
        "experiment", "--gin_file", ARM, "--gin_file", "gin/platforms/tpu.gin",
        "--root", ROOT, "--distributed",
    ]  # fmt: skip
    order = [" ".join(argv[:5]) for argv in fake.commands]
    assert order.index("gcloud compute tpus queued-resources create") < order.index(
        "gcloud compute tpus queued-resources scp"
    )
    record = json.loads(fake.files[record_path(str(tmp_path), "balanced")])
    assert record["commit"] == launch.commit and record["provisioning"] == "spot"


def test_v5e_256_tpu_vm_on_demand_and_reserved():
    for provisioning, flag in (("on-demand", None), ("reserved", "--reserved")):
        launch = spec(backend="tpu-vm", provisioning=provisioning)
        fake = Scripted({"describe": ["READY"]})
        launcher.create(launch, runner=fake, launch_dir="/unused", sleep=lambda s: None)
        (create,) = fake.find("tpu-vm", "create")
        assert {"--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite"} <= set(create)
        assert (flag in create) if flag else not {"--spot", "--reserved"} & set(create)
        assert fake.find("tpu-vm", "ssh", "--worker=all", "worker_setup.sh")
        assert fake.find("tpu-vm", "ssh", "--worker=all", "worker_start.sh", ROOT, "--distributed")


def test_two_slice_v5p_512_queued_resource():
    launch = spec(accelerator="v5p-512", num_slices=2, zone="us-east5-a")
    fake = Scripted({"describe": ["ACTIVE"]})
    launcher.create(launch, runner=fake, launch_dir="/unused", sleep=lambda s: None)

    assert launch.tpu.processes == 128  # 64 hosts in each of 2 slices
    (create,) = fake.find("queued-resources", "create")
    for flag in ("--accelerator-type=v5p-512", "--node-count=2", "--node-prefix=balanced",
                 "--runtime-version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a"):  # fmt: skip
        assert flag in create
    assert not any(arg.startswith("--node-id") for arg in create)
    (start,) = fake.find("queued-resources", "ssh", "--node=all", "--worker=all", "worker_start")
    argv = shlex.split(next(a for a in start if a.startswith("--command=")).split("=", 1)[1])
    assert argv[argv.index("--gin_bindings") + 1] == "make_mesh.dcn_data = 2"
    assert "--distributed" in argv


def test_xpk_workload():
    launch = spec(backend="xpk", cluster="team-v5e", image="gcr.io/my-proj/codemix", max_restarts=5)
    fake = Scripted()
    launcher.create(launch, runner=fake, launch_dir="/unused")

    image = f"gcr.io/my-proj/codemix:{launch.commit[:12]}"
    (create,) = fake.find("xpk", "workload", "create")
    for flag in ("--workload=balanced", "--cluster=team-v5e", "--zone=us-west4-a",
                 "--tpu-type=v5litepod-256", "--num-slices=1", f"--docker-image={image}",
                 "--max-restarts=5"):  # fmt: skip
        assert flag in create
    command = shlex.split(next(a for a in create if a.startswith("--command=")).split("=", 1)[1])
    assert command[:2] == ["codemix", "experiment"]
    assert command[-3:] == ["--root", ROOT, "--distributed"]
    (build,) = fake.find("docker", "build", "launch/Dockerfile")
    assert image in build
    assert fake.commands.index(fake.find("docker", "push", image)[0]) < fake.commands.index(create)
    assert not fake.find("gcloud")  # the cluster's slices are the team's


def test_skypilot_task_file(tmp_path):
    launch = spec(backend="skypilot")
    fake = Scripted()
    launcher.create(launch, runner=fake, launch_dir=str(tmp_path))

    task = fake.files[SkyPilot(launch, str(tmp_path)).task_path]
    assert "accelerators: tpu-v5litepod-256" in task and "use_spot: true" in task
    assert "runtime_version: v2-alpha-tpuv5-lite" in task and "zone: us-west4-a" in task
    assert f"--root {ROOT} --distributed" in task and "worker_setup.sh" in task
    assert fake.find("sky", "jobs", "launch", "--name=balanced")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--accelerator", "v5e-300"], "no v5e slice of size 300"),
        (["--accelerator", "v9-8"], "unknown TPU accelerator 'v9-8'"),
        (["--zone", "us-central2-b"], "zone 'us-central2-b' has no TPU v5e"),
        (["--root", "/home/me/runs/x"], "the run root '/home/me/runs/x' must be a gs:// path"),
        (["--gin_bindings", "make_mesh.tensor = 3"], "does not factor into v5e-256"),
        (["--gin_bindings", "MixtureInput.global_batch_size = 64"], "a per-chip batch of zero"),
        (["--backend", "tpu-vm", "--num_slices", "2"], "multi-slice jobs use --backend queued"),
    ],
)
def test_bad_input_is_refused_before_any_command(tmp_path, monkeypatch, caplog, flags, message):
    fake = Refusing()
    monkeypatch.setattr(commands, "_runner", lambda args: fake)
    with caplog.at_level(logging.ERROR):
        assert cli.main(create_flags(tmp_path, *flags)) == 2
    assert message in caplog.text
    assert fake.commands == [] and fake.files == {}


def create_flags(launch_dir, *extra: str) -> list[str]:
    defaults = {
        "--name": "balanced",
        "--backend": "queued",
        "--accelerator": "v5e-256",
        "--zone": "us-west4-a",
        "--provisioning": "spot",
        "--gin_file": ARM,
        "--root": ROOT,
        "--launch_dir": str(launch_dir),
    }
    given = dict(zip(extra[::2], extra[1::2], strict=True))
    flags = {**defaults, **{k: v for k, v in given.items() if k != "--gin_bindings"}}
    bindings = [a for k, v in given.items() if k == "--gin_bindings" for a in (k, v)]
    pairs = [arg for pair in flags.items() for arg in pair]
    return ["launch", "create", *pairs, *bindings, "--allow_dirty"]


def test_preempted_queued_resource_is_recreated_and_resumes(tmp_path, caplog):
    launch = spec()
    running, done = all_workers("running"), all_workers("exited 0")
    fake = Scripted({
        "describe": ["ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE"],
        "kill -0": [running, running, done],
    })  # fmt: skip
    steps = {f"{ROOT}/pretrain": 1200, f"{ROOT}/cooldown": None}
    with caplog.at_level(logging.INFO):
        code = launcher.watch(
            launch, runner=fake, launch_dir=str(tmp_path), sleep=lambda s: None,
            newest_step=steps.get,
        )  # fmt: skip

    assert code == 0
    verbs = [" ".join(argv[3:5]) for argv in fake.commands if argv[0] == "gcloud"]
    recreate = verbs.index("queued-resources delete")
    assert verbs[recreate : recreate + 2] == ["queued-resources delete", "queued-resources create"]
    assert "--force" in fake.find("queued-resources", "delete")[0]
    assert len(fake.find("worker_start.sh", "--distributed")) == 1  # started again, same command
    assert "was preempted (state SUSPENDED)" in caplog.text
    assert f"resumes from {ROOT}/pretrain at step 1200" in caplog.text
    record = json.loads(fake.files[record_path(str(tmp_path), "balanced")])
    assert record["restarts"] == 1


def test_a_failed_command_is_not_restarted(caplog):
    fake = Scripted({"describe": ["ACTIVE"], "kill -0": [all_workers("exited 3")]})
    with caplog.at_level(logging.INFO):
        code = launcher.watch(spec(), runner=fake, launch_dir="/unused", sleep=lambda s: None)
    assert code == 1 and "not a preemption" in caplog.text
    assert not fake.find("create") and not fake.find("delete")


@pytest.mark.parametrize("broken", ["exited 4", "exited 5"])
def test_a_broken_job_is_started_again_on_the_same_slice(broken, tmp_path, caplog):
    """A process lost (exit 4 on the others) or a step hung (5): the same command again, which
    resumes; no new slice. Then it finishes."""
    states = [broken, *all_workers("exited 0").splitlines()[1:]]
    ended, done = "\n".join(states), all_workers("exited 0")
    fake = Scripted({"describe": ["ACTIVE"], "kill -0": [ended, ended, done, done]})
    with caplog.at_level(logging.INFO):
        code = launcher.watch(
            spec(), runner=fake, launch_dir=str(tmp_path), sleep=lambda s: None,
            newest_step={f"{ROOT}/pretrain": 800}.get,
        )  # fmt: skip
    assert code == 0
    assert len(fake.find("worker_start.sh", "--distributed")) == 1
    assert not fake.find("create") and not fake.find("delete")
    assert (
        "the job broke" in caplog.text
        and f"resumes from {ROOT}/pretrain at step 800" in caplog.text
    )
    assert json.loads(fake.files[record_path(str(tmp_path), "balanced")])["restarts"] == 1


def test_a_broken_job_is_not_restarted_past_max_restarts(caplog):
    broken = all_workers("exited 4")
    fake = Scripted({"describe": ["ACTIVE"], "kill -0": [broken, broken]})
    launch = dataclasses.replace(spec(), restarts=10, max_restarts=10)
    code = launcher.watch(launch, runner=fake, launch_dir="/unused", sleep=lambda s: None)
    assert code == 1 and not fake.find("worker_start.sh")


def test_delete_of_a_queued_resource_still_waiting(tmp_path):
    launch = spec()
    fake = Scripted({"describe": ["WAITING_FOR_RESOURCES"]})
    text = launcher.status(launch, runner=fake, launch_dir=str(tmp_path))
    assert "WAITING_FOR_RESOURCES" in text and "cancels the request" in text
    launcher.delete(launch, runner=fake, launch_dir=str(tmp_path))
    (delete,) = fake.find("queued-resources", "delete")
    assert delete[4:6] == ["delete", "balanced"] and "--force" in delete
    assert not fake.find("ssh")  # nothing to reach on a request that has no VMs yet
    assert fake.removed == [record_path(str(tmp_path), "balanced")]


def test_dry_run_through_the_cli_runs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    class Refuse(runner.Shell):
        def run(self, argv, *, capture=False):
            raise AssertionError(f"a dry run ran {argv}")

        def write(self, path, text):
            raise AssertionError(f"a dry run wrote {path}")

    monkeypatch.setattr(commands, "Shell", Refuse)
    launch_dir = tmp_path / "launches"
    assert cli.main([*create_flags(launch_dir), "--project", "my-proj", "--dry_run"]) == 0
    assert not launch_dir.exists()

    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("git -C ") and " archive " in lines[0]
    assert lines[1].startswith("gcloud compute tpus queued-resources create balanced ")
    assert all(line.startswith(("git", "gcloud")) for line in lines)
    for line in lines:
        shlex.split(line)  # copy-pastable: each line parses as one shell command
    assert f"# would write {record_path(str(launch_dir), 'balanced')}:" in out
    assert "(256 chips, 64 processes)" in out and "gin/platforms/tpu.gin appended" in out


def test_later_subcommands_need_only_the_name(tmp_path, monkeypatch, capsys):
    launch = dataclasses.replace(spec(), restarts=2)
    path = record_path(str(tmp_path), "balanced")
    os.makedirs(tmp_path, exist_ok=True)
    with open(path, "w") as f:
        f.write(launch.to_json())
    assert load_record(str(tmp_path), "balanced") == launch

    argv = ["launch", "logs", "--name", "balanced", "--launch_dir", str(tmp_path), "--dry_run"]
    assert cli.main([*argv, "--worker", "all"]) == 0
    logs = capsys.readouterr().out.strip()
    assert "queued-resources ssh balanced --node=all --worker=all" in logs
    assert "tail -n 100 -f ~/codemix.log" in logs
    assert cli.main(["launch", "stop", "--name", "nope", "--launch_dir", str(tmp_path)]) == 2
