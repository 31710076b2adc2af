"""The project's multiple-choice task files as lm-evaluation-harness tasks, for exported models.

lm-eval reads a task from a YAML file; ours point its ``json`` dataset loader at a JSONL task file
(no download), keep each choice exactly as written (no delimiter added before it: ours start
with their own space) and report acc and acc_norm, so lm-eval on an export and `codemix eval mc`
on the checkpoint score the same requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from codemix_jax.eval import multiple_choice

LM_EVAL_PREFIX = "codemix_"


def lm_eval_task_yaml(task_file: str) -> str:
    """One task's YAML (JSON is YAML): name ``codemix_<file name>``, the file's items as test."""
    task = {
        "task": LM_EVAL_PREFIX + multiple_choice.task_name(task_file),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(task_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    return json.dumps(task, indent=1) + "\n"


def write_lm_eval_tasks(out_dir: str, task_files: Sequence[str]) -> list[str]:
    """Writes one YAML per task file into ``out_dir`` (lm-eval's ``--include_path``); returns
    the task names to pass to ``--tasks``."""
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for task_file in task_files:
        multiple_choice.read_task(task_file)  # a bad row fails here, not deep in lm-eval
        name = LM_EVAL_PREFIX + multiple_choice.task_name(task_file)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            f.write(lm_eval_task_yaml(task_file))
        names.append(name)
    return names
