"""The code the workers run: the committed tree at one commit, shipped as a `git archive`.

Shipping the commit (not the working tree) makes a launch reproducible and its record exact; a
tree with uncommitted changes is refused unless ``--allow_dirty``, since those changes would not
reach the workers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from codemix_jax.gin_config import REPO_ROOT


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, check=False
    )


def head_commit(*, allow_dirty: bool) -> str:
    """HEAD's commit; refused if tracked files have uncommitted changes and not ``allow_dirty``."""
    head = _git("rev-parse", "HEAD")
    if head.returncode:
        raise ValueError(f"{REPO_ROOT} is not a git checkout: the launcher ships a commit")
    changed = _git("status", "--porcelain", "--untracked-files=no").stdout.split("\n")
    changed = [line[3:] for line in changed if line.strip()]
    if changed and not allow_dirty:
        raise ValueError(
            f"uncommitted changes in {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}: "
            "the workers get the committed tree only; commit them, or pass --allow_dirty to "
            "launch HEAD without them"
        )
    return head.stdout.strip()


def check_committed(paths: Sequence[str], *, commit: str) -> None:
    """Each path (a gin file) must be in ``commit``: the workers have nothing else."""
    for path in paths:
        if _git("cat-file", "-e", f"{commit}:{path}").returncode:
            raise ValueError(
                f"gin file {path!r} is not in commit {commit[:12]}: the workers get the committed "
                "tree only; give a path inside the repository and commit the file"
            )


def archive_path(commit: str) -> str:
    return f"/tmp/codemix-{commit[:12]}.tar.gz"


def archive_argv(commit: str) -> list[str]:
    return [
        "git",
        "-C",
        REPO_ROOT,
        "archive",
        "--format=tar.gz",
        "-o",
        archive_path(commit),
        commit,
    ]
