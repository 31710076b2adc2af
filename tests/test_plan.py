"""`codemix plan`: steps, step time and chip-hours from the budgets and the FLOPs formula, shared
stages of a grid counted once, paper A's figures, the memory verdict, and bad input refused
before anything compiles.

Two compiles in all (a tiny model that fits a v5e-8 slice and one that does not); the paper A
arms are planned without compiling (``check_memory=False``, `--no_aot`).
"""

import contextlib
import io
import json
import logging

import pytest

from codemix_jax import cli, planner

SMOKE_STAGES = "gin/experiments/smoke_stages.gin"
BALANCED = "gin/experiments/paper_a/balanced.gin"
BALANCED_COOLDOWN = "gin/experiments/paper_a/balanced_cooldown.gin"
BALANCED_TO_TEXT = "gin/experiments/paper_a/balanced_to_text.gin"
CODE_SHARE_50 = "gin/experiments/paper_a/code_share_50.gin"
V5E_PEAK = 197e12

# The tiny model (d 64, 2 layers, 4 heads of 16, SwiGLU FFN 256, tied 2,048 vocab) at seq 128:
# 6 x matmul parameters (q, k, v, o; three FFN kernels; the tied head) + 12 x layers x seq x d.
TINY_FLOPS_PER_TOKEN = 6 * (2 * (4 * 64 * 64 + 3 * 64 * 256) + 2048 * 64) + 12 * 2 * 128 * 64
# Paper A's 470M (d 1024, 12 layers, FFN 4096, tied 256,000 vocab) at seq 8192, the same way.
PAPER_A_470M_FLOPS_PER_TOKEN = (
    6 * (12 * (4 * 1024 * 1024 + 3 * 1024 * 4096) + 256_000 * 1024) + 12 * 12 * 8192 * 1024
)


class Collect(logging.StreamHandler):
    pass


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``codemix plan ...`` in process: exit status, stdout and the log."""
    log = io.StringIO()
    handler = Collect(log)  # not a plain StreamHandler, which the cli replaces with its own
    logging.getLogger().addHandler(handler)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = cli.main(["plan", *argv])
    finally:
        logging.getLogger().removeHandler(handler)
    return status, stdout.getvalue(), log.getvalue()


def test_steps_step_time_and_chip_hours_follow_the_budget_and_the_flops_formula():
    plan = planner.plan_costs(
        experiments=[[SMOKE_STAGES]], topology="v5e-8", mfu=(0.3, 0.6), check_memory=False
    )
    stages = plan.experiments[SMOKE_STAGES]
    # smoke_stages.gin: 1,228,800 + 819,200 + 409,600 tokens at 32 x 128 = 4,096 a step.
    assert [(s.name, s.budget.steps) for s in stages] == [
        ("pretrain", 300), ("continued", 200), ("cooldown", 100)
    ]  # fmt: skip
    pretrain = stages[0]
    assert pretrain.flops_per_step == 4096 * TINY_FLOPS_PER_TOKEN
    for mfu in (0.3, 0.6):
        step = 4096 * TINY_FLOPS_PER_TOKEN / (8 * V5E_PEAK * mfu)
        assert plan.step_seconds(pretrain, mfu) == pytest.approx(step, rel=1e-12)
        hours = 300 * step / 3600
        assert plan.hours(pretrain.flops, mfu) == pytest.approx(hours, rel=1e-12)
        assert plan.chip_hours(pretrain.flops, mfu) == pytest.approx(8 * hours, rel=1e-12)
    # Half the MFU, twice the chip-hours.
    assert plan.chip_hours(pretrain.flops, 0.3) == pytest.approx(
        2 * plan.chip_hours(pretrain.flops, 0.6), rel=1e-12
    )
    assert all(stage.verdict.text() == "not checked" for stage in stages)


def test_totals_are_the_sums_of_the_stages():
    status, out, _ = run_cli(
        ["--gin_file", SMOKE_STAGES, "--topology", "v5e-8", "--no_aot", "--json"]
    )
    assert status == 0
    report = json.loads(out)
    assert report["mfu"] == [0.6, 0.3]  # costs are listed at the high MFU first
    experiment = report["experiments"][SMOKE_STAGES]
    for key in ("chip_hours", "hours"):
        for end in range(2):
            total = sum(stage[key][end] for stage in experiment["stages"])
            assert experiment["total"][key][end] == pytest.approx(total, rel=1e-12)
            assert report["total"][key][end] == pytest.approx(total, rel=1e-12)
    fast, slow = experiment["total"]["chip_hours"]
    assert slow == pytest.approx(2 * fast, rel=1e-12)


def test_a_stage_two_arms_share_counts_once_in_the_grid():
    """balanced_cooldown.gin's pretrain is balanced.gin's (one --root trains it once); the 200B
    pretrain of balanced_to_text.gin has the same name but another budget: not shared; but
    code_share_50.gin's is that one (other arm files, the same run)."""
    plan = planner.plan_costs(
        experiments=[[BALANCED], [BALANCED_COOLDOWN], [BALANCED_TO_TEXT], [CODE_SHARE_50]],
        topology="v5e-256",
        check_memory=False,
    )
    balanced = plan.experiments[BALANCED]
    pretrain, cooldown = plan.experiments[BALANCED_COOLDOWN]
    to_text = plan.experiments[BALANCED_TO_TEXT]
    (code_share_50,) = plan.experiments[CODE_SHARE_50]
    assert pretrain.shared_with == BALANCED and code_share_50.shared_with == BALANCED_TO_TEXT
    assert [s.shared_with for s in (*balanced, cooldown, *to_text)] == [""] * 4
    assert to_text[0].name == "pretrain" and to_text[0].budget.tokens == 200e9
    counted = sum(s.flops for s in (*balanced, cooldown, *to_text))
    assert sum(s.flops for s in plan.counted) == pytest.approx(counted, rel=1e-12)
    text = planner.format_costs(plan)
    assert f"(shared with {BALANCED})" in text
    assert (
        f"shared stages counted once: pretrain of {BALANCED_COOLDOWN}, pretrain of {CODE_SHARE_50}"
        in text
    )
    grid_total = next(line for line in text.splitlines() if "grid total" in line)
    low, high = plan.mfu
    assert (
        f"{plan.chip_hours(counted, high):,.0f}-{plan.chip_hours(counted, low):,.0f}" in grid_total
    )


def test_paper_a_470m_chip_hours_at_the_implied_mfu_are_the_papers():
    """Paper A: 4,736 v5e chip-hours per 200B tokens at 470M; at the MFU that figure implies for
    our FLOPs count, the planner's chip-hours for a 200B arm are the paper's."""
    implied = PAPER_A_470M_FLOPS_PER_TOKEN * 200e9 / (4736 * 3600 * V5E_PEAK)
    plan = planner.plan_costs(
        experiments=[[CODE_SHARE_50]], topology="v5e-256", mfu=(implied, 0.6), check_memory=False
    )
    (stage,) = plan.experiments[CODE_SHARE_50]
    assert stage.flops_per_token == PAPER_A_470M_FLOPS_PER_TOKEN
    trained = stage.tokens / 200e9  # 47,684 whole steps: 200B tokens +0.0006 %
    assert plan.chip_hours(stage.flops, implied) / trained == pytest.approx(4736, rel=1e-9)
    assert f"paper A's 470M: 4,736 v5e chip-hours, i.e. {implied:.1%} MFU" in (
        planner.format_costs(plan)
    )
    assert f"{implied:.1%}" == "23.8%"


@pytest.fixture(scope="module")
def fitting_plan():
    """The tiny three-stage chain on a v5e-8 slice with the TPU kernels: one compile for all
    three stages (same model, batch and mesh; other mixtures and schedules)."""
    return run_cli(
        ["--gin_file", SMOKE_STAGES, "--topology", "v5e-8",
         "--gin_bindings", "token_losses.chunk_size = 128"]
    )  # fmt: skip


@pytest.fixture(scope="module")
def unfitting_plan():
    """The same chain at sequence 32,768 with dense attention: each chip would hold a
    [1, 4, 32768, 32768] float32 score matrix (16 GiB) of its one row."""
    return run_cli(
        ["--gin_file", SMOKE_STAGES, "--topology", "v5e-8", "--no_platform_gin",
         "--gin_bindings", "MixtureInput.seq_len = 32768",
         "--gin_bindings", "ModelConfig.max_seq_len = 32768",
         "--gin_bindings", "MixtureInput.global_batch_size = 8"]
    )  # fmt: skip


def test_a_step_that_fits_is_compiled_once_for_its_stages(fitting_plan):
    pytest.importorskip("libtpu", reason="the memory verdict compiles for TPU: needs libtpu")
    status, out, log = fitting_plan
    assert status == 0
    assert log.count("compiling step") == 1 and "compiling step 1 of 1" in log
    assert "platform gin: gin/platforms/tpu.gin" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("pre", "cont", "cool"))]
    assert len(rows) == 3 and all(row.endswith("of 15.75 GiB: fits") for row in rows)


def test_a_step_that_does_not_fit_is_named_and_exits_1(unfitting_plan):
    pytest.importorskip("libtpu", reason="the memory verdict compiles for TPU: needs libtpu")
    status, out, _ = unfitting_plan
    assert status == cli.EXIT_DOES_NOT_FIT == 1
    assert "platform gin: none" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("pre", "cont", "cool"))]
    assert len(rows) == 3 and all(row.endswith("of 15.75 GiB: DOES NOT FIT") for row in rows)
    assert "total" in out  # the whole table is printed before the exit


@pytest.mark.parametrize(
    ("topology", "arm_line", "flags", "message"),
    [
        ("v5e-3", "", [], "no v5e slice of size 3"),
        ("v9-8", "", [], "unknown TPU accelerator 'v9-8'"),
        ("v5e-8", "make_mesh.tensor = 3", [], "the gin mesh does not factor into v5e-8"),
        ("v5e-8", "MixtureInput.global_batch_size = 4", [],
         "a per-chip batch of zero: global batch 4 over 8 batch shards"),
        ("v5e-8", "", ["--mfu", "0,0.5"], "MFU must be one value or a range"),
    ],
)  # fmt: skip
def test_bad_input_is_named_before_anything_compiles(tmp_path, topology, arm_line, flags, message):
    """The bad setting is in the second arm of a grid: had the first arm's step been compiled
    before the second arm was laid on the slice, the log would say so."""
    bad_arm = tmp_path / "bad_arm.gin"
    bad_arm.write_text(f"include '{SMOKE_STAGES}'\n{arm_line}\n")
    status, out, log = run_cli(
        ["--grid", SMOKE_STAGES, str(bad_arm), "--topology", topology, *flags]
    )
    assert status == 2
    assert message in log and out == ""
    if arm_line:  # the arm and stage the bad value is in
        assert f"{bad_arm}, stage 'pretrain': " in log
    assert "compiling step" not in log
