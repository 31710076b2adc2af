"""Evaluation records: one JSON file per checkpoint and task, kept with the run.

``RUN_DIR/evals/STEP/TASK.json`` holds a list of flat records, one per metric, each with the run,
stage, step, tokens seen, task, metric, value and the number of items: the rows a notebook reads
to plot "score against tokens of code seen" across runs. Written to a temporary file, then
renamed: a killed evaluation leaves no half record, so a rerun redoes exactly what is missing.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from codemix_jax.trained import TrainedModel


def record_path(run_dir: str, step: int, task: str) -> str:
    return os.path.join(run_dir, "evals", str(step), f"{task}.json")


def has_record(run_dir: str, step: int, task: str) -> bool:
    return os.path.exists(record_path(run_dir, step, task))


def write_record(
    trained: TrainedModel,
    *,
    task: str,
    metrics: dict[str, float],
    n: int,
    details: dict[str, Any] | None = None,
) -> str:
    """Writes the records of one task on one checkpoint; returns the file's path.

    ``details`` (per-item scores, settings) goes in a sibling ``TASK.details.json``, so the
    records stay small enough to read thousands at once.
    """
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    common = {
        "run": trained.run_dir,
        "stage": os.path.basename(trained.run_dir),
        "step": trained.step,
        "tokens_seen": trained.tokens_seen,
        "task": task,
        "n": n,
        "written_at": when,
    }
    records = [{**common, "metric": metric, "value": value} for metric, value in metrics.items()]
    path = record_path(trained.run_dir, trained.step, task)
    if details is not None:
        _write_json(path.removesuffix(".json") + ".details.json", details)
    _write_json(path, records)
    return path


def read_records(run_dir: str) -> list[dict[str, Any]]:
    """Every record of a run, in step then task order."""
    root = os.path.join(run_dir, "evals")
    if not os.path.isdir(root):
        return []
    records = []
    for step in sorted(os.listdir(root), key=int):
        for name in sorted(os.listdir(os.path.join(root, step))):
            if name.endswith(".json") and not name.endswith(".details.json"):
                with open(os.path.join(root, step, name)) as f:
                    records.extend(json.load(f))
    return records


def _write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(partial, path)
