"""End to end through the `codemix` CLI: smoke training works, bad input fails clearly."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from codemix_jax import cli, gin_config

SMOKE = "gin/experiments/smoke.gin"
TINY = "gin/models/tiny.gin"
TIMINGS = {"tokens_per_second", "step_time_s", "mfu"}
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+: ")  # the CLI's format
# What TF, libtpu and tf_text's SentencePiece printed before `codemix train` had started.
START_UP_NOISE = (
    "absl::InitializeLog",
    "Could not find cuda drivers",
    "cuInit",
    "oneDNN",
    "TPU",
    "Source Location Trace",
    "InitGoogle",
    "normalizer.cc",
)


def data_bindings(local_data) -> list[str]:
    return [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
    ]


def run_cli(args: list[str], bindings: list[str]) -> int:
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    return cli.main([*args, *flags])


def test_smoke_training_lowers_loss_and_writes_outputs(local_data, tmp_path):
    run_dir = tmp_path / "run"
    bindings = [
        *data_bindings(local_data),
        "NUM_STEPS = 40",
        "WARMUP_STEPS = 5",
        "train.log_every = 10",
        "MixtureInput.global_batch_size = 8",
    ]
    started = time.perf_counter()
    assert run_cli(["train", "--gin_file", SMOKE, "--run_dir", str(run_dir)], bindings) == 0
    elapsed = time.perf_counter() - started

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40]
    for key in ("loss", "learning_rate", "grad_norm"):
        assert all(key in r for r in records), key
    for source in ("code", "text", "markup"):
        assert any(f"loss/{source}" in r for r in records), source
    assert records[-1]["loss"] < records[0]["loss"] - 0.5

    # Step 1 compiles: its record has no throughput rather than 0 tok/s; the first figure (steps
    # 2..10) is real: consistent, under the peak, and no faster than the whole run allows.
    first, measured, *others = records
    assert not TIMINGS & first.keys()
    assert all(record.keys() >= TIMINGS for record in (measured, *others))
    assert measured["tokens_per_second"] == pytest.approx(8 * 128 / measured["step_time_s"])
    assert 0 < measured["mfu"] < 1
    assert 9 * measured["step_time_s"] < elapsed

    events = os.listdir(run_dir / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    config = (run_dir / "config.gin").read_text()
    assert "NUM_STEPS = 40" in config
    assert "ModelConfig.d_model" in config


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train.num_stepz = 3", "num_stepz"),
        ("ModelConfg.d_model = 3", "ModelConfg"),
        ("make_mesh.data = 3", "product 3"),
        ("local_sources.corpus_dir = '/no/such/corpus'", "/no/such/corpus"),
    ],
)
def test_bad_input_fails_early_and_names_the_value(local_data, tmp_path, caplog, binding, message):
    run_dir = tmp_path / "run"
    bindings = [*data_bindings(local_data), binding]
    with caplog.at_level(logging.ERROR):
        code = run_cli(["train", "--gin_file", SMOKE, "--run_dir", str(run_dir)], bindings)
    assert code == 2
    assert message in caplog.text
    assert not (run_dir / "metrics.jsonl").exists()


def test_missing_gin_file_is_named(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = cli.main(["train", "--gin_file", "gin/nope.gin", "--run_dir", str(tmp_path)])
    assert code == 2
    assert "gin/nope.gin" in caplog.text


def test_params_json_for_the_grid(capsys):
    assert cli.main(["params", "--gin_file", "gin/models/470m.gin", "--json"]) == 0
    # Exact, as in the README's model grid (hand-counted in tests/test_model.py).
    assert json.loads(capsys.readouterr().out) == {
        "total": 463_483_904,
        "embedding": 262_144_000,
        "non_embedding": 201_339_904,
    }


def test_python_m_trains_with_one_log_format_and_no_start_up_noise(local_data, tmp_path):
    """``python -m codemix_jax train`` as a user runs it: every stderr line is a log line in the
    CLI's format, with its time; none is the native libraries' start-up noise."""
    bindings = [
        *data_bindings(local_data),
        "NUM_STEPS = 3",
        "WARMUP_STEPS = 1",
        "MixtureInput.global_batch_size = 8",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    command = [sys.executable, "-m", "codemix_jax", "train", "--run_dir", str(tmp_path / "run")]
    result = subprocess.run(
        [*command, "--gin_file", SMOKE, *flags],
        cwd=gin_config.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = result.stderr.splitlines()
    assert any("codemix_jax.train: training steps 1..3 on mesh" in line for line in lines)
    assert [line for line in lines if not LOG_LINE.match(line)] == []
    for noise in START_UP_NOISE:
        assert noise not in result.stderr


def test_installed_console_script_runs():
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "codemix"), "params", "--gin_file", TINY],
        cwd=gin_config.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "total: 262,464" in result.stdout
