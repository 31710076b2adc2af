"""`codemix experiment`: token budgets, the papers' arms planned at full and tiny scale, and a real
chain of stages interrupted by a kill, rerun, and checked stage against stage."""

import glob
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from codemix_jax import cli, run_dir
from codemix_jax.budget import token_budget, warmup_budget
from codemix_jax.data import (
    MixtureInput,
    build_local_corpus,
    equal_phases,
    paper_a_local_sources,
)
from codemix_jax.experiment import plan_experiment

PAPER_A_FULL = 4_194_304  # tokens per step: batch 512 x sequence 8192
SMOKE_ARM = "gin/experiments/smoke_stages.gin"
# The chain under test: tiny budgets of smoke_stages.gin at 8 x 32 = 256 tokens per step.
STEPS = {"pretrain": 4, "continued": 12, "cooldown": 3}
STAGE_BINDINGS = [
    "MixtureInput.seq_len = 32",
    "MixtureInput.global_batch_size = 8",
    f"pretrain/Stage.tokens = {STEPS['pretrain'] * 256}",
    "pretrain/Stage.warmup_tokens = 256",
    f"continued/Stage.tokens = {STEPS['continued'] * 256}",
    "continued/Stage.warmup_tokens = 512",
    f"cooldown/Stage.tokens = {STEPS['cooldown'] * 256}",
    "train.log_every = 1",
    "train.checkpoint_every = 1",
    "train.keep_checkpoints = 100",
    "MixtureInput.shuffle_buffer_size = 16",
]


def flags(bindings: list[str]) -> list[str]:
    return [flag for binding in bindings for flag in ("--gin_bindings", binding)]


def chain_bindings(local_data) -> list[str]:
    return [
        f"local_sources.corpus_dir = '{local_data.corpus_dir}'",
        f"MixtureInput.vocab_path = '{local_data.vocab_path}'",
        *STAGE_BINDINGS,
    ]


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def text(*parts: str) -> str:
    return Path(*parts).read_text()


def params_at(stage_dir: str, step: int):
    return ocp.StandardCheckpointer().restore(
        os.path.join(stage_dir, "checkpoints", str(step), "state")
    )["params"]


# --- token budgets ------------------------------------------------------------------------------


def test_token_budget_is_the_nearest_whole_step_and_never_under_one_batch():
    budget = token_budget(200e9, tokens_per_step=PAPER_A_FULL, what="stage 'x'")
    assert budget.steps == 47_684  # 200e9 / 4,194,304 = 47,683.7
    assert budget.trained_tokens == 47_684 * PAPER_A_FULL == 200_001_191_936
    assert "47,684 steps (200,001,191,936 tokens, +0.0006%)" in budget.derivation()
    assert token_budget(40e9, tokens_per_step=PAPER_A_FULL, what="x").steps == 9_537  # 9,536.7
    assert token_budget(1.49 * 256, tokens_per_step=256, what="x").steps == 1
    assert token_budget(1.5 * 256, tokens_per_step=256, what="x").steps == 2
    assert warmup_budget(1325 * PAPER_A_FULL, tokens_per_step=PAPER_A_FULL, what="x").steps == 1325
    assert warmup_budget(0, tokens_per_step=PAPER_A_FULL, what="x").steps == 0
    with pytest.raises(
        ValueError, match=r"stage 'x': 4,000 tokens is less than one batch of 4,096"
    ):
        token_budget(4000, tokens_per_step=4096, what="stage 'x'")
    with pytest.raises(ValueError, match="warmup tokens must be >= 0"):
        warmup_budget(-1, tokens_per_step=4096, what="x")


def test_equal_phases_follow_the_run_length():
    shares = [{"text": 0.5, "code": 0.5}, {"text": 0.6, "code": 0.4}, {"text": 0.7, "code": 0.3}]
    starts = [start for start, _ in equal_phases(shares=shares * 1 + shares[-1:], num_steps=10)]
    assert starts == [0, 2, 5, 7]
    assert [start for start, _ in equal_phases(shares=shares, num_steps=600)] == [0, 200, 400]
    with pytest.raises(ValueError, match="3 phases need at least as many steps, got 2"):
        equal_phases(shares=shares, num_steps=2)


def test_paper_a_local_stand_ins_split_the_code_shards(tmp_path):
    """Every code language reads its own, non-empty subset of the local Python shards."""
    corpus_dir = str(tmp_path / "corpus")
    build_local_corpus(out_dir=corpus_dir, max_bytes_per_source=300_000, docs_per_shard=2)
    sources = {s.name: s for s in paper_a_local_sources(corpus_dir=corpus_dir)}
    code = {
        name: set(tf.io.gfile.glob(source.train))
        for name, source in sources.items()
        if source.category == "code"
    }
    assert all(code.values()), {name: len(files) for name, files in code.items()}
    assert sum(len(files) for files in code.values()) == len(set().union(*code.values()))
    assert set().union(*code.values()) == set(glob.glob(f"{corpus_dir}/code/train-*"))
    assert set(tf.io.gfile.glob(sources["synthetic_code"].train)) == code["code_python"]
    markup = set(glob.glob(f"{corpus_dir}/markup/train-*"))
    adjacent = set(tf.io.gfile.glob(sources["code_adjacent"].train))
    assert adjacent and adjacent < markup
    assert set(tf.io.gfile.glob(sources["markup"].train)) == markup - adjacent


# --- plans of the papers' arms ------------------------------------------------------------------


def cosine(count: int, *, peak: float, final: float, warmup: int, total: int) -> float:
    if count < warmup:
        return peak * count / warmup
    return final + (peak - final) * 0.5 * (
        1 + math.cos(math.pi * (count - warmup) / (total - warmup))
    )


def test_full_scale_plan_of_balanced_to_text_with_cooldown(tmp_path, capsys):
    """Paper A's numbers worked by hand: 512 x 8192 tokens per step, 200B + 200B + 40B tokens,
    1,325 warmup steps, cosine 3e-4 -> 3e-5, then the cooldown from there to 1e-6."""
    root = tmp_path / "root"
    arm = "gin/experiments/paper_a/balanced_to_text_cooldown.gin"
    assert cli.main(["experiment", "--gin_file", arm, "--root", str(root), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert not root.exists()  # A dry run writes nothing.

    plan = plan_experiment(gin_files=[arm], root=str(root))
    pretrain, continued, cooldown = plan.stages
    assert [s.name for s in plan.stages] == ["pretrain", "continued", "cooldown"]
    assert [s.budget.steps for s in plan.stages] == [47_684, 47_684, 9_537]
    assert {s.budget.tokens_per_step for s in plan.stages} == {PAPER_A_FULL}
    assert [s.warmup.steps for s in (pretrain, continued)] == [1325, 1325]
    assert cooldown.warmup is None
    last = cosine(47_683, peak=3e-4, final=3e-5, warmup=1325, total=47_684)
    for stage in (pretrain, continued):
        assert stage.first_lr == 0.0
        assert stage.last_lr == pytest.approx(last, rel=1e-6)
    assert cooldown.first_lr == np.float32(continued.last_lr)
    assert cooldown.last_lr == np.float32(1e-6)
    assert (pretrain.init, continued.init.name, cooldown.init.name) == (
        None,
        "pretrain",
        "continued",
    )
    assert (continued.with_optimizer, cooldown.with_optimizer) == (False, True)
    assert f"InitFrom.run_dir = '{root}/continued'" in cooldown.runner_bindings
    assert "InitFrom.step = 47684" in cooldown.runner_bindings
    assert dict(pretrain.mixture[0][1])["text"] == 0.5
    assert dict(continued.mixture[0][1])["text"] == 0.9
    assert dict(cooldown.mixture[0][1])["high_quality"] == 0.5
    assert "200B / 4,194,304 tokens per step = 47,684 steps" in printed
    assert "40B / 4,194,304 tokens per step = 9,537 steps" in printed
    assert "params and optimizer state from stage 'continued' at step 47,684" in printed


def test_the_2p8b_arm_differs_only_in_the_model(tmp_path):
    small = plan_experiment(
        gin_files=["gin/experiments/paper_a/balanced_to_text_cooldown.gin"], root=str(tmp_path)
    )
    large = plan_experiment(
        gin_files=["gin/experiments/paper_a/2p8b/balanced_to_text_cooldown.gin"], root=str(tmp_path)
    )
    from codemix_jax.model import ModelConfig

    assert ModelConfig().d_model == 2048  # The last stage's config is left parsed.
    for a, b in zip(small.stages, large.stages, strict=True):
        assert (a.budget, a.warmup, a.mixture, a.first_lr, a.last_lr) == (
            b.budget,
            b.warmup,
            b.mixture,
            b.first_lr,
            b.last_lr,
        )


def test_wsd_is_a_stable_stage_then_a_decay_stage_from_its_last_lr(tmp_path):
    stable, decay = plan_experiment(
        gin_files=["gin/experiments/smoke_wsd.gin"], root=str(tmp_path)
    ).stages
    assert (stable.first_lr, stable.last_lr) == (0.0, np.float32(3e-3))
    assert (decay.first_lr, decay.last_lr) == (np.float32(3e-3), np.float32(3e-5))
    assert (decay.init.name, decay.with_optimizer) == ("stable", True)
    assert [stable.budget.steps, stable.warmup.steps, decay.budget.steps] == [300, 30, 75]


def readme_arms() -> dict[str, list[tuple[str, float]]]:
    """The README's arm table: file -> [(stage, full-scale tokens), ...]."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    with open("README.md") as f:
        rows = re.findall(
            r"^\| [AB] \|.*\| `(gin/experiments/[^`]+)` \| ([^|]+) \|$", f.read(), re.M
        )
    table = {}
    for path, stages in rows:
        parsed = re.findall(r"(\w+) ([\d.]+)([KMBT])", stages)
        table[path] = [(name, float(number) * units[unit]) for name, number, unit in parsed]
    return table


ARMS = sorted(glob.glob("gin/experiments/paper_[ab]/**/*.gin", recursive=True))
ARMS = [arm for arm in ARMS if "/parts/" not in arm]


def test_the_readme_table_lists_every_arm():
    assert sorted(readme_arms()) == ARMS


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_plans_at_full_and_tiny_scale_with_the_readme_tokens(arm, tmp_path):
    full = plan_experiment(gin_files=[arm], root=str(tmp_path))
    assert [(s.name, s.full_tokens) for s in full.stages] == readme_arms()[arm]
    tiny = plan_experiment(gin_files=[arm], root=str(tmp_path), scale="tiny")
    ratio = 400 if "paper_a" in arm else 200  # full-scale steps per tiny step
    for big, small in zip(full.stages, tiny.stages, strict=True):
        assert small.budget.tokens == big.budget.tokens / tiny.scale.token_divisor
        assert small.budget.tokens_per_step * 1024 == big.budget.tokens_per_step
        assert abs(small.budget.steps * ratio - big.budget.steps) <= ratio, small.name
        assert (small.first_lr, small.last_lr) != (big.first_lr, big.last_lr) or small.init
    for index in range(len(tiny.stages)):
        tiny.plan(index)  # Parses the stage's config: a tiny run reads local raw text.
        for source in MixtureInput().sources:
            assert not source.train.startswith("gs://") and not source.pretokenized, source
    assert not os.listdir(tmp_path)


# --- bad chains ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["cooldown/Stage.init = 'pretrian'"],
            "stage 'cooldown' starts from stage 'pretrian', which this experiment does not have",
        ),
        (
            ["continued/Stage.tokens = 100"],
            "stage 'continued': 100 tokens is less than one batch of 256",
        ),
        (
            ["pretrain/Stage.start_lr = 'previous'"],
            "stage 'pretrain': start_lr='previous' needs a stage to continue",
        ),
        (
            ["continued/Stage.init = 'cooldown'"],
            "stage 'continued' starts from 'cooldown', which is not an earlier stage",
        ),
        (
            ["--stage", "cooldown"],
            "starts from stage 'continued', which has not finished: no checkpoint of 12",
        ),
        (
            ["cooldown/Stage.gin_files = ['gin/schedules/cosine.gin']", "WARMUP_STEPS = 1"],
            "stage 'cooldown': start_lr gives START_LR = 0.000",
        ),
        (["train.num_steps = 5"], "stage 'pretrain': train.num_steps is 5, not the 4 steps"),
        (["--stage", "cooldwn"], "no stage 'cooldwn' in this experiment"),
        (["--scale", "tiny"], "unknown scale 'tiny'; this experiment has ['full']"),
    ],
    ids=[
        "missing_stage",
        "under_one_batch",
        "nothing_to_continue",
        "later_stage",
        "unfinished_init",
        "start_lr_unread",
        "num_steps_not_from_tokens",
        "no_such_stage",
        "no_such_scale",
    ],
)
def test_bad_chains_are_refused_by_name_before_anything_is_written(
    local_data, tmp_path, caplog, extra, message
):
    root = tmp_path / "root"
    options = [arg for arg in extra if "=" not in arg]
    bindings = [arg for arg in extra if "=" in arg]
    args = ["experiment", "--gin_file", SMOKE_ARM, "--root", str(root), *options]
    with caplog.at_level(logging.ERROR):
        assert cli.main([*args, *flags([*chain_bindings(local_data), *bindings])]) == 2
    assert message in caplog.text
    assert not root.exists()


# --- a real chain: killed in its second stage, rerun to the end ---------------------------------


@pytest.fixture(scope="module")
def chain(local_data, tmp_path_factory):
    """The chain run once in a process killed just after the second stage's first checkpoint,
    then rerun in this process. Returns the root, the rerun's log and what the kill left."""
    root = str(tmp_path_factory.mktemp("chain") / "root")
    args = [
        "experiment",
        "--gin_file",
        SMOKE_ARM,
        "--root",
        root,
        *flags(chain_bindings(local_data)),
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "codemix_jax", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        while not os.path.isdir(os.path.join(root, "continued", "checkpoints", "1")):
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            time.sleep(0.02)
    finally:
        first.kill()
        first.wait()
    killed = {
        "latest": run_dir.latest_step(os.path.join(root, "continued")),
        "pretrain_metrics": text(root, "pretrain", "metrics.jsonl"),
    }
    assert 1 <= killed["latest"] < STEPS["continued"], "the kill came too late to interrupt"

    handler = _Collect()
    logging.getLogger().addHandler(handler)
    try:
        assert cli.main(args) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    return root, "\n".join(handler.lines), killed


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_rerun_skips_finished_stages_and_resumes_the_interrupted_one(chain):
    root, log, killed = chain
    assert f"stage 'pretrain' is finished (step {STEPS['pretrain']}" in log
    assert f"stage 'continued': resuming at step {killed['latest']}" in log
    assert f"resuming from the checkpoint at step {killed['latest']}" in log
    assert "stage 'cooldown': starting in" in log
    # The finished stage was not touched; the interrupted one logs each step once, although the
    # killed process may have logged past its checkpoint.
    assert text(root, "pretrain", "metrics.jsonl") == killed["pretrain_metrics"]
    continued = records(os.path.join(root, "continued", "metrics.jsonl"))
    assert [r["step"] for r in continued] == list(range(1, STEPS["continued"] + 1))
    cooldown = records(os.path.join(root, "cooldown", "metrics.jsonl"))
    assert [r["step"] for r in cooldown] == list(range(1, STEPS["cooldown"] + 1))
    for name, steps in STEPS.items():
        assert run_dir.latest_step(os.path.join(root, name)) == steps, name


def test_a_new_stage_starts_from_the_final_params_of_the_stage_it_continues(chain):
    """continued's first step trains at LR 0 (its warmup starts at 0), so its step-1 checkpoint
    holds exactly the params it started from: pretrain's final ones, bit for bit."""
    root, _, _ = chain
    first = records(os.path.join(root, "continued", "metrics.jsonl"))[0]
    assert (first["step"], first["learning_rate"]) == (1, 0.0)
    started = params_at(os.path.join(root, "continued"), 1)
    final = params_at(os.path.join(root, "pretrain"), STEPS["pretrain"])
    for actual, expected in zip(jax.tree.leaves(started), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(actual, expected)
    later = params_at(os.path.join(root, "continued"), 2)
    assert any(
        np.any(a != b) for a, b in zip(jax.tree.leaves(later), jax.tree.leaves(final), strict=True)
    )


def test_the_cooldown_anneals_from_the_lr_the_previous_stage_logged_last_to_1e_6(chain):
    root, _, _ = chain
    continued = records(os.path.join(root, "continued", "metrics.jsonl"))[-1]
    cooldown = records(os.path.join(root, "cooldown", "metrics.jsonl"))
    assert continued["step"] == STEPS["continued"] and continued["learning_rate"] > 1e-4
    assert cooldown[0]["learning_rate"] == continued["learning_rate"]
    assert cooldown[-1]["learning_rate"] == float(np.float32(1e-6))
    config = text(root, "cooldown", "config.gin")
    assert f"START_LR = {continued['learning_rate']!r}" in config


def test_every_stage_dir_holds_its_operative_config(chain):
    root, _, _ = chain
    for name, steps in STEPS.items():
        config = text(root, name, "config.gin")
        assert f"NUM_STEPS = {steps}" in config, name
        assert ("InitFrom.run_dir" in config) == (name != "pretrain"), name
    assert f"InitFrom.run_dir = '{root}/pretrain'" in text(root, "continued", "config.gin")


def test_a_finished_stage_of_other_settings_is_refused(local_data, chain, caplog):
    """A root whose finished stage was trained with another model is not silently reused."""
    root, _, _ = chain
    before = sorted(os.listdir(os.path.join(root, "cooldown", "checkpoints")))
    args = ["experiment", "--gin_file", SMOKE_ARM, "--root", root]
    bindings = [*chain_bindings(local_data), "ModelConfig.d_ff = 128"]
    with caplog.at_level(logging.ERROR):
        assert cli.main([*args, *flags(bindings)]) == 2
    assert "stage 'pretrain' in" in caplog.text
    assert "ModelConfig.d_ff: saved 256 vs now 128" in caplog.text
    assert sorted(os.listdir(os.path.join(root, "cooldown", "checkpoints"))) == before


def test_a_damaged_final_checkpoint_of_the_stage_before_is_trained_again(
    local_data, chain, tmp_path, caplog
):
    """pretrain's final checkpoint, the one continued starts from, garbled after pretrain finished.
    The rerun sets it aside (kept), trains pretrain's last step again from its step before, to
    the same params bit for bit, and starts continued from them."""
    root, _, _ = chain
    fresh = tmp_path / "root"
    shutil.copytree(os.path.join(root, "pretrain"), fresh / "pretrain")
    final = STEPS["pretrain"]
    shards = [p for p in (fresh / "pretrain" / "checkpoints" / str(final)).rglob("d/*")]
    assert shards
    for path in shards:
        path.write_bytes(b"garbled" * 64)
    args = ["experiment", "--gin_file", SMOKE_ARM, "--root", str(fresh), "--stage", "continued"]
    with caplog.at_level(logging.INFO):
        assert cli.main([*args, *flags(chain_bindings(local_data))]) == 0

    checkpoints = fresh / "pretrain" / "checkpoints"
    assert f"stage 'continued' cannot start from {checkpoints} step {final}: it does not" in (
        caplog.text
    )
    assert f"stage 'pretrain': resuming at step {final - 1}" in caplog.text
    (aside,) = os.listdir(fresh / "pretrain" / "checkpoints_damaged")
    assert aside.startswith(f"{final}-")
    original = params_at(os.path.join(root, "pretrain"), final)
    for retrained, started, expected in zip(
        jax.tree.leaves(params_at(str(fresh / "pretrain"), final)),
        jax.tree.leaves(params_at(str(fresh / "continued"), 1)),  # trained at LR 0
        jax.tree.leaves(original),
        strict=True,
    ):
        np.testing.assert_array_equal(retrained, expected)
        np.testing.assert_array_equal(started, expected)
    continued = records(fresh / "continued" / "metrics.jsonl")
    assert [r["step"] for r in continued] == list(range(1, STEPS["continued"] + 1))
