"""`codemix launch` subcommands: flags in, a launch spec and a runner, one launcher call.

A refused launch is a ValueError (exit 2, before any command); a cloud command that fails stops
the launch with the command and its stderr (exit 1).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from codemix_jax.launch import checks, launcher
from codemix_jax.launch.job import LaunchSpec, load_record, record_path
from codemix_jax.launch.runner import DryRun, LaunchFailed, Runner, Shell


def _runner(args: argparse.Namespace) -> Runner:
    return DryRun() if args.dry_run else Shell()


def _failing_loudly(action: Callable[[], object]) -> object:
    try:
        return action()
    except LaunchFailed as error:
        raise SystemExit(f"codemix launch: {error}") from error


def create(args: argparse.Namespace) -> None:
    spec = LaunchSpec(
        name=args.name,
        backend=args.backend,
        accelerator=args.accelerator,
        zone=args.zone,
        project=args.project,
        num_slices=args.num_slices,
        provisioning=args.provisioning,
        gin_files=tuple(args.gin_file),
        gin_bindings=tuple(args.gin_bindings),
        run_dir=args.run_dir,
        root=args.root,
        scale=args.scale,
        stage=args.stage,
        platform_gin=not args.no_platform_gin,
        runtime_version=args.runtime_version,
        cluster=args.cluster,
        image=args.image,
        max_restarts=args.max_restarts,
    )
    path = record_path(args.launch_dir, spec.name)
    if os.path.exists(path):
        raise ValueError(f"a launch named {spec.name!r} exists ({path}): delete it or rename")
    spec = checks.check_launch(
        spec, allow_unlisted_zone=args.allow_unlisted_zone, allow_dirty=args.allow_dirty
    )
    runner = _runner(args)
    _failing_loudly(lambda: launcher.create(spec, runner=runner, launch_dir=args.launch_dir))


def status(args: argparse.Namespace) -> None:
    spec = load_record(args.launch_dir, args.name)
    text = _failing_loudly(
        lambda: launcher.status(spec, runner=_runner(args), launch_dir=args.launch_dir)
    )
    print(text, flush=True)


def logs(args: argparse.Namespace) -> None:
    spec = load_record(args.launch_dir, args.name)
    _failing_loudly(
        lambda: launcher.logs(
            spec,
            runner=_runner(args),
            launch_dir=args.launch_dir,
            worker_id=args.worker,
            follow=not args.no_follow,
        )
    )


def stop(args: argparse.Namespace) -> None:
    spec = load_record(args.launch_dir, args.name)
    _failing_loudly(lambda: launcher.stop(spec, runner=_runner(args), launch_dir=args.launch_dir))


def delete(args: argparse.Namespace) -> None:
    spec = load_record(args.launch_dir, args.name)
    _failing_loudly(lambda: launcher.delete(spec, runner=_runner(args), launch_dir=args.launch_dir))


def watch(args: argparse.Namespace) -> None:
    spec = load_record(args.launch_dir, args.name)
    code = _failing_loudly(
        lambda: launcher.watch(
            spec, runner=_runner(args), launch_dir=args.launch_dir, poll_s=args.poll_s
        )
    )
    if code:
        raise SystemExit(code)
