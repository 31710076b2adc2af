"""What an experiment will cost on a TPU slice, and whether its steps fit (`codemix plan`).

Every stage of every arm is planned from its real gin config (as `codemix experiment` would run
it) and laid on the slice (``job_shape``) before anything compiles, so a bad topology, mesh or
batch is refused by name in seconds. Cost is model FLOPs (6N + attention, as MFU counts them) over
the slice's peak at an assumed MFU range; the memory verdict is `codemix aot`'s, compiled once per
distinct step and reused by every stage that runs the same step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence

import gin

from codemix_jax import aot, experiment
from codemix_jax.budget import Budget, short_tokens
from codemix_jax.data import MixtureInput
from codemix_jax.job_shape import JobShape, stage_shapes
from codemix_jax.model import ModelConfig, count_parameters, training_flops_per_token
from codemix_jax.tpu_topology import GIB, TPU_GENERATIONS, TPU_PLATFORM_GIN, TpuSlice, tpu_slice

log = logging.getLogger(__name__)

# Paper A's own cost (Aryabumi et al. 2024): v5e chip-hours per 200B tokens, by our parameter
# count of its two models (gin/models/470m.gin, gin/models/2p8b.gin; README's model grid).
PAPER_A_TOKENS = 200e9
PAPER_A_V5E_CHIP_HOURS = {463_483_904: ("470M", 4_736), 2_806_061_056: ("2.8B", 13_824)}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """`codemix aot`'s answer for one step, or 'not checked' (``--no_aot``)."""

    checked: bool
    fits: bool = True
    total_bytes: int = 0
    hbm_bytes: int = 0

    def text(self) -> str:
        if not self.checked:
            return "not checked"
        word = "fits" if self.fits else "DOES NOT FIT"
        return f"{self.total_bytes / GIB:.2f} of {self.hbm_bytes / GIB:.2f} GiB: {word}"


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One stage's work: its budget, its model's FLOPs per token, and its step's verdict."""

    experiment: str
    name: str
    budget: Budget
    flops_per_token: float
    parameters: int
    seq_len: int
    step_key: str  # stages with equal keys compile the same step (see _step_key)
    shared_with: str  # the experiment that already counts this very stage; '' if none
    verdict: Verdict

    @property
    def tokens(self) -> int:
        return self.budget.trained_tokens

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.budget.tokens_per_step

    @property
    def flops(self) -> float:
        return self.flops_per_step * self.budget.steps


@dataclasses.dataclass(frozen=True)
class CostPlan:
    """Stages of one or more experiments on one slice, at an assumed MFU range (low, high)."""

    tpu: TpuSlice
    mfu: tuple[float, float]
    platform_gin: str
    experiments: dict[str, list[StageCost]]

    @property
    def stages(self) -> list[StageCost]:
        return [stage for stages in self.experiments.values() for stage in stages]

    @property
    def counted(self) -> list[StageCost]:
        """Every stage once: one shared by several experiments counts in the first only."""
        return [stage for stage in self.stages if not stage.shared_with]

    @property
    def fits(self) -> bool:
        return all(stage.verdict.fits for stage in self.stages)

    def step_seconds(self, stage: StageCost, mfu: float) -> float:
        return stage.flops_per_step / (self.tpu.chips * self.tpu.generation.peak_flops * mfu)

    def chip_hours(self, flops: float, mfu: float) -> float:
        """Chip-hours to do ``flops`` at ``mfu`` of peak: independent of the number of chips."""
        return flops / (self.tpu.generation.peak_flops * mfu) / 3600

    def hours(self, flops: float, mfu: float) -> float:
        return self.chip_hours(flops, mfu) / self.tpu.chips


def implied_mfu(*, flops_per_token: float, tokens: float, chip_hours: float, peak: float) -> float:
    """The MFU at which ``chip_hours`` train ``tokens`` of a model of ``flops_per_token``."""
    return flops_per_token * tokens / (chip_hours * 3600 * peak)


def plan_costs(
    *,
    experiments: Sequence[Sequence[str]],
    bindings: Sequence[str] = (),
    topology: str,
    num_slices: int = 1,
    mfu: Sequence[float] = (0.3, 0.6),
    platform_gin: str = TPU_PLATFORM_GIN,
    check_memory: bool = True,
    scale: str = experiment.FULL,
) -> CostPlan:
    """Plan every stage of ``experiments`` (each a list of gin files) on ``topology``.

    All stages are planned and laid on the slice first, so a bad value fails before the first
    compile. All experiments share one (empty, temporary) root, as arms run under one
    ``--root`` do: a stage two arms both have, with the same config, is trained once.
    """
    tpu = tpu_slice(topology, num_slices=num_slices)
    if len(mfu) not in (1, 2) or not 0 < min(mfu) <= max(mfu) <= 1:
        raise ValueError(f"MFU must be one value or a range 'low,high' in (0, 1], got {mfu}")
    low, high = min(mfu), max(mfu)
    labels = [_label(files) for files in experiments]
    if len(set(labels)) != len(labels):
        raise ValueError(f"an experiment is given twice: {labels}")
    platform = [platform_gin] if platform_gin else []
    with tempfile.TemporaryDirectory() as scratch:
        root = os.path.join(scratch, "root")  # never created: every stage plans as new
        setups = {
            label: _laid_out(label, [*files, *platform], bindings, root=root, scale=scale, tpu=tpu)
            for label, files in zip(labels, experiments, strict=True)
        }
    steps: dict[str, _Setup] = {}  # the first stage of each distinct step compiles it
    for setup in (setup for stages in setups.values() for setup in stages):
        steps.setdefault(setup.step_key, setup)
    verdicts = _verdicts(list(steps.values()), tpu=tpu, check_memory=check_memory)
    return CostPlan(tpu, (low, high), platform_gin, _costs(setups, verdicts))


@dataclasses.dataclass(frozen=True)
class _Setup:
    """A planned stage laid on the slice, before its step is compiled."""

    experiment: str
    name: str
    budget: Budget
    shape: JobShape
    model: ModelConfig
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    step_key: str
    identity: str


def _laid_out(
    label: str, files: list[str], bindings: Sequence[str], *, root: str, scale: str, tpu: TpuSlice
) -> list[_Setup]:
    plan = experiment.plan_experiment(gin_files=files, bindings=bindings, root=root, scale=scale)
    setups: dict[str, _Setup] = {}
    stages = stage_shapes(plan.stages, accelerator=tpu.accelerator, num_slices=tpu.num_slices)
    try:
        for stage, shape in stages:
            init = setups[stage.init.name].identity if stage.init else "scratch"
            setups[stage.name] = _Setup(
                experiment=label,
                name=stage.name,
                budget=stage.budget,
                shape=shape,
                model=ModelConfig(),
                gin_files=stage.gin_files,
                bindings=stage.bindings,
                step_key=_step_key(shape),
                identity=f"{stage.name}\n{init}\n{_stage_config()}",
            )
    except ValueError as error:
        raise ValueError(f"{label}, {error}") from error
    return list(setups.values())


def _step_key(shape: JobShape) -> str:
    """What the compiled train step is built from, read from the parsed gin config.

    ``build_train_program`` gets the model config, the batch's shape and number of sources, the
    mesh, the logical-axis rules, the optimizer, microbatches and the NaN policy; the loss reads
    its chunk size. The LR schedule and the mixture's shares are not here: they change values
    the step computes (a scalar LR, which rows come from where), not its buffers, so the stages
    of an arm, which differ in those, share one compile.
    """
    parts = [
        repr(ModelConfig()),
        f"batch {shape.global_batch_size} x {shape.seq_len}, {shape.microbatches} microbatches",
        f"sources {len(MixtureInput().source_names)}, mesh {shape.mesh} x {shape.tpu.num_slices}",
        *(
            f"{name}: {_configured('train.' + name)}"
            for name in ("rules", "optimizer", "nonfinite")
        ),
        f"token_losses: {sorted(gin.get_bindings('token_losses').items())}",
    ]
    return "\n".join(parts)


def _configured(selector: str) -> str:
    """A train() argument as gin binds it: a reference with its own bindings, or its value."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return "default"
    if isinstance(value, gin.config.ConfigurableReference):
        return f"{value} {sorted(gin.get_bindings(value.selector).items())}"
    return repr(value)


def _stage_config() -> str:
    """The parsed stage's whole gin config, less the arm's lists of stages and scales and the
    macros nothing left reads (other stages' budgets, say): two arms whose stage of one name has
    the same config train the very same run."""
    sections = re.split(r"\n(?=# Parameters for )", gin.config_str())
    macros = sections.pop(0) if sections[0].startswith("# Macros:") else ""
    arm_only = re.compile(r"# Parameters for ([\w.]+/)?(experiment|Stage|Scale):")
    kept = "\n".join(section for section in sections if not arm_only.match(section))
    entries = re.split(r"\n(?=\w+ = )", macros)  # a macro's value may go on over indented lines
    used = [entry for entry in entries if f"%{entry.split(' = ')[0]}" in kept]
    return "\n".join([*used, kept])


def _verdicts(setups: list[_Setup], *, tpu: TpuSlice, check_memory: bool) -> dict[str, Verdict]:
    """One compile per distinct step (with progress: each takes about a minute)."""
    if not check_memory:
        return {setup.step_key: Verdict(checked=False) for setup in setups}
    verdicts = {}
    for number, setup in enumerate(setups, start=1):
        log.info(
            "compiling step %d of %d (%s, stage %r) for %s: about a minute when it fits",
            number, len(setups), setup.experiment, setup.name, tpu.accelerator,
        )  # fmt: skip
        start = time.perf_counter()
        report = aot.aot_compile(
            gin_files=setup.gin_files,
            gin_bindings=setup.bindings,
            accelerator=tpu.accelerator,
            num_slices=tpu.num_slices,
        )
        verdicts[setup.step_key] = Verdict(True, report.fits, report.total_bytes, report.hbm_bytes)
        log.info("%s (%.0f s)", verdicts[setup.step_key].text(), time.perf_counter() - start)
    return verdicts


def _costs(
    setups: dict[str, list[_Setup]], verdicts: dict[str, Verdict]
) -> dict[str, list[StageCost]]:
    first_of: dict[str, str] = {}  # stage identity -> the experiment that counts it
    costs: dict[str, list[StageCost]] = {}
    for label, stages in setups.items():
        costs[label] = []
        for setup in stages:
            shared_with = first_of.setdefault(setup.identity, label)
            costs[label].append(
                StageCost(
                    experiment=label,
                    name=setup.name,
                    budget=setup.budget,
                    flops_per_token=_flops_per_token(setup.model, setup.shape.seq_len),
                    parameters=_parameters(setup.model),
                    seq_len=setup.shape.seq_len,
                    step_key=setup.step_key,
                    shared_with="" if shared_with == label else shared_with,
                    verdict=verdicts[setup.step_key],
                )
            )
    return costs


@functools.cache
def _flops_per_token(model: ModelConfig, seq_len: int) -> float:
    return training_flops_per_token(model, seq_len)


@functools.cache
def _parameters(model: ModelConfig) -> int:
    return count_parameters(model)["total"]


def _label(files: Sequence[str]) -> str:
    return " + ".join(files)


def format_costs(plan: CostPlan) -> str:
    """The table `codemix plan` prints: stages, totals per experiment and for the grid, and the
    cost per 200B tokens of each model beside paper A's."""
    low, high = plan.mfu
    tpu = plan.tpu
    lines = [
        f"{tpu.accelerator}"
        + (f" x {tpu.num_slices} slices" if tpu.num_slices > 1 else "")
        + f": {tpu.chips} chips, {tpu.generation.peak_flops / 1e12:g} TFLOP/s bf16 peak and "
        f"{tpu.hbm_bytes / GIB:.2f} GiB HBM per chip; ranges are at {high:.0%} - {low:.0%} MFU",
        "platform gin: "
        + (f"{plan.platform_gin}, parsed after each arm's files" if plan.platform_gin else "none"),
    ]
    header = ("stage", "tokens", "steps", "tokens/step", "FLOPs/step", "step s", "hours",
              "chip-hours", "memory per chip")  # fmt: skip
    for label, stages in plan.experiments.items():
        rows = [header, *(_stage_row(plan, stage) for stage in stages)]
        rows.append(_total_row(plan, "total", stages))
        lines += ["", label, *_aligned(rows)]
    if len(plan.experiments) > 1:
        lines += ["", *_aligned([header, _total_row(plan, "grid total", plan.counted)])]
        shared = sorted({f"{s.name} of {s.experiment}" for s in plan.stages if s.shared_with})
        lines += [f"  shared stages counted once: {', '.join(shared)}"] if shared else []
    return "\n".join([*lines, "", *_per_model_lines(plan)])


def _stage_row(plan: CostPlan, stage: StageCost) -> tuple[str, ...]:
    low, high = plan.mfu
    return (
        stage.name,
        short_tokens(stage.tokens),
        f"{stage.budget.steps:,}",
        f"{stage.budget.tokens_per_step:,}",
        f"{stage.flops_per_step:.3g}",
        f"{plan.step_seconds(stage, high):.3g}-{plan.step_seconds(stage, low):.3g}",
        _range(plan.hours, stage.flops, plan.mfu),
        _range(plan.chip_hours, stage.flops, plan.mfu),
        stage.verdict.text() + (f" (shared with {stage.shared_with})" if stage.shared_with else ""),
    )


def _total_row(plan: CostPlan, name: str, stages: list[StageCost]) -> tuple[str, ...]:
    flops = sum(stage.flops for stage in stages)
    steps = sum(stage.budget.steps for stage in stages)
    tokens = sum(stage.tokens for stage in stages)
    fits = all(stage.verdict.fits for stage in stages)
    return (
        name, short_tokens(tokens), f"{steps:,}", "", "", "",
        _range(plan.hours, flops, plan.mfu), _range(plan.chip_hours, flops, plan.mfu),
        "" if fits else "DOES NOT FIT",
    )  # fmt: skip


def _range(cost, flops: float, mfu: tuple[float, float]) -> str:
    low, high = mfu
    return f"{_figure(cost(flops, high))}-{_figure(cost(flops, low))}"


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _per_model_lines(plan: CostPlan) -> list[str]:
    """Chip-hours per 200B tokens of each model, and for paper A's models the paper's figure and
    the MFU it implies at v5e's peak."""
    low, high = plan.mfu
    lines = [f"per {short_tokens(PAPER_A_TOKENS)} tokens (at {high:.0%} - {low:.0%} MFU):"]
    for parameters, seq_len, flops_per_token in sorted(_models(plan)):
        flops = flops_per_token * PAPER_A_TOKENS
        line = (
            f"  {short_tokens(parameters)} parameters at seq {seq_len:,} "
            f"({flops_per_token:.3g} FLOPs/token): {_range(plan.chip_hours, flops, plan.mfu)} "
            f"{plan.tpu.generation.topology_prefix} chip-hours"
        )
        if parameters in PAPER_A_V5E_CHIP_HOURS:
            name, paper = PAPER_A_V5E_CHIP_HOURS[parameters]
            mfu = implied_mfu(
                flops_per_token=flops_per_token,
                tokens=PAPER_A_TOKENS,
                chip_hours=paper,
                peak=TPU_GENERATIONS["v5e"].peak_flops,
            )
            line += f"; paper A's {name}: {paper:,} v5e chip-hours, i.e. {mfu:.1%} MFU"
        lines.append(line)
    return lines


def _models(plan: CostPlan) -> set[tuple[int, int, float]]:
    return {(s.parameters, s.seq_len, s.flops_per_token) for s in plan.stages}


def costs_json(plan: CostPlan) -> dict:
    """The same as one JSON-ready object (`codemix plan --json`)."""
    low, high = plan.mfu

    def cost(flops: float) -> dict:
        return {
            "chip_hours": [plan.chip_hours(flops, high), plan.chip_hours(flops, low)],
            "hours": [plan.hours(flops, high), plan.hours(flops, low)],
        }

    def stage_json(stage: StageCost) -> dict:
        return {
            "name": stage.name,
            "tokens": stage.tokens,
            "steps": stage.budget.steps,
            "tokens_per_step": stage.budget.tokens_per_step,
            "flops_per_step": stage.flops_per_step,
            "step_seconds": [plan.step_seconds(stage, high), plan.step_seconds(stage, low)],
            **cost(stage.flops),
            "memory": dataclasses.asdict(stage.verdict),
            "shared_with": stage.shared_with,
        }

    return {
        "topology": plan.tpu.accelerator,
        "num_slices": plan.tpu.num_slices,
        "chips": plan.tpu.chips,
        "mfu": [high, low],
        "platform_gin": plan.platform_gin,
        "experiments": {
            label: {
                "stages": [stage_json(stage) for stage in stages],
                "total": cost(sum(stage.flops for stage in stages)),
            }
            for label, stages in plan.experiments.items()
        },
        "total": cost(sum(stage.flops for stage in plan.counted)),
        "fits": plan.fits,
    }
