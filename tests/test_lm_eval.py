"""lm-evaluation-harness, offline, on an exported tiny model agrees with `codemix eval mc`."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from codemix_jax import cli
from codemix_jax.eval import multiple_choice, records

TASK = "arithmetic"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lm_eval_samples(export: str, include_path: str, out: str) -> list[dict]:
    """Runs the `lm_eval` command as the README shows it; returns its per-item samples."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export},dtype=float32",
        "--include_path",
        include_path,
        "--tasks",
        f"codemix_{TASK}",
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--log_samples",
        "--output_path",
        out,
    ]
    env = {**os.environ, **OFFLINE}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = glob.glob(os.path.join(out, "*", f"samples_codemix_{TASK}_*.jsonl"))
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda sample: sample["doc_id"])


def test_lm_eval_on_the_export_scores_what_codemix_eval_mc_scores(
    trained_run, exported_run, tmp_path
):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    assert cli.main(["eval", "mc", "--run_dir", run_dir, "--step", "8", "--task", TASK]) == 0
    include = str(tmp_path / "tasks")
    assert cli.main(["eval", "lm-eval-tasks", "--out", include, "--task", TASK]) == 0

    samples = lm_eval_samples(exported_run, include, str(tmp_path / "lm_eval_out"))
    details = records.record_path(run_dir, 8, f"mc_{TASK}").replace(".json", ".details.json")
    with open(details) as f:
        ours = json.load(f)["loglikelihoods"]
    items = multiple_choice.read_task(multiple_choice.task_path(TASK))
    assert len(samples) == len(items) == len(ours)
    for sample, item, scores in zip(samples, items, ours, strict=True):
        assert sample["doc"]["context"] == item.context
        theirs = [float(response[0]) for response in sample["filtered_resps"]]
        assert theirs == pytest.approx(scores, abs=1e-4)
    ours_acc = {r["metric"]: r["value"] for r in records.read_records(run_dir)}
    assert ours_acc["acc"] == pytest.approx(sum(s["acc"] for s in samples) / len(samples))
    assert ours_acc["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in samples) / len(items))
