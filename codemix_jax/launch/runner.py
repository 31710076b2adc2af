"""Where the launcher's commands go: to the shell, or, for ``--dry_run``, to stdout only.

Every command and every file passes through a runner, so a dry run prints exactly what a real run
would do, and tests replace the runner to see (and script) each cloud command.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Protocol


class Runner(Protocol):
    dry_run: bool

    def run(self, argv: Sequence[str], *, capture: bool = False) -> str: ...
    def write(self, path: str, text: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def note(self, text: str) -> None: ...


class LaunchFailed(RuntimeError):
    """The cloud said no: a failed command, a slice lost before it was ready."""


class CommandError(LaunchFailed):
    """A cloud command failed: the launch stops here, naming the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(
            f"command failed (exit {returncode}): {shlex.join(argv)}\n{stderr.strip()}".rstrip()
        )


class Shell:
    """Runs each command; stops at the first that fails."""

    dry_run = False

    def run(self, argv: Sequence[str], *, capture: bool = False) -> str:
        """Run ``argv``; with ``capture`` return its stdout, else let it print to the terminal."""
        print(f"$ {shlex.join(argv)}", flush=True)
        result = subprocess.run(list(argv), capture_output=capture, text=True, check=False)
        if result.returncode:
            raise CommandError(argv, result.returncode, result.stderr or "")
        return result.stdout or ""

    def write(self, path: str, text: str) -> None:
        path = os.path.expanduser(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def remove(self, path: str) -> None:
        path = os.path.expanduser(path)
        if os.path.exists(path):
            os.remove(path)

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)


class DryRun:
    """Prints every command (shell-quoted, one a line) and every file; runs and writes nothing."""

    dry_run = True

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout

    def run(self, argv: Sequence[str], *, capture: bool = False) -> str:
        print(shlex.join(argv), file=self.out, flush=True)
        return ""

    def write(self, path: str, text: str) -> None:
        print(f"# would write {path}:", file=self.out)
        for line in text.rstrip("\n").split("\n"):
            print(f"#   {line}", file=self.out)

    def remove(self, path: str) -> None:
        print(f"# would remove {path}", file=self.out)

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)
