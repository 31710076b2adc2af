"""`codemix experiment`: run the stages of one arm in order, each in ``<root>/<stage>``, each new
stage starting from the final checkpoint of the stage it continues.

Rerunning continues where a run stopped: finished stages are skipped, a partial one resumes from
its newest checkpoint (``train()`` does that), and later ones follow. The whole chain is planned
first, so a bad arm (a missing stage, a budget under one batch, a stage of another run in the
root) is refused before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from codemix_jax import gin_config, run_dir
from codemix_jax.budget import short_tokens
from codemix_jax.checkpoint import Checkpoints
from codemix_jax.init_from import DamagedSourceError
from codemix_jax.stage_plan import StagePlan, plan_stage, require_finished_init
from codemix_jax.stages import FULL, Experiment, Scale
from codemix_jax.train import train

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExperimentPlan:
    """An arm at one scale under one root: how to plan each stage again, and the plans."""

    experiment: Experiment
    arm_files: tuple[str, ...]  # the arm's files, then its scale's
    cli_bindings: tuple[str, ...]
    scale: Scale
    root: str
    stages: list[StagePlan]

    def plan(self, index: int) -> StagePlan:
        """Stage ``index`` from what is on disk now and the earlier stages' plans; leaves its gin
        config parsed."""
        return plan_stage(
            self.experiment,
            index,
            arm_files=self.arm_files,
            cli_bindings=self.cli_bindings,
            token_divisor=self.scale.token_divisor,
            root=self.root,
            earlier=self.stages[:index],
        )


def plan_experiment(
    *, gin_files: Sequence[str], bindings: Sequence[str] = (), root: str, scale: str = FULL
) -> ExperimentPlan:
    """Read the arm at ``scale``, then plan every stage; a bad stage is refused here, by name.

    The scale's files are parsed after the arm's wherever the arm is read, so its macros reach
    the stage list too (e.g. a stage's data file named by a macro).
    """
    gin_config.parse(gin_files, bindings)
    chosen = Experiment().scale(scale)
    arm_files = (*gin_files, *chosen.gin_files)
    gin_config.parse(arm_files, bindings)
    plan = ExperimentPlan(Experiment(), arm_files, tuple(bindings), chosen, root, [])
    for index in range(len(plan.experiment.stages)):
        plan.stages.append(plan.plan(index))
    return plan


def run_experiment(plan: ExperimentPlan, *, only: str | None = None) -> None:
    """Train the stages that are not finished, in order (or only the stage named ``only``)."""
    indices = range(len(plan.stages)) if only is None else [plan.experiment.stage_index(only)]
    for index in indices:
        _run_stage(plan, index)


def _run_stage(plan: ExperimentPlan, index: int) -> None:
    """Train stage ``index`` unless it is finished.

    It is planned again just before it runs, so it sees what the stages before it left: their
    final checkpoints and the LR they logged last. If the final checkpoint it starts from turns
    out damaged, the stage that wrote it trains its last steps again first.
    """
    stage = plan.stages[index] = plan.plan(index)
    where = (stage.name, stage.latest_step, stage.run_dir)
    if stage.finished:
        log.info("stage %r is finished (step %d in %s): skipping", *where)
        return
    require_finished_init(stage)
    if stage.latest_step:
        log.info("stage %r: resuming at step %d in %s", *where)
    else:
        log.info("stage %r: starting in %s, %s", stage.name, stage.run_dir, _init_text(stage))
    gin_config.parse(stage.gin_files, stage.bindings)
    try:
        train(run_dir=stage.run_dir)
    except DamagedSourceError as damaged:
        _retrain_source(plan, stage, damaged)
        _run_stage(plan, index)
        return
    plan.stages[index] = dataclasses.replace(stage, latest_step=run_dir.latest_step(stage.run_dir))


def _retrain_source(plan: ExperimentPlan, stage: StagePlan, damaged: DamagedSourceError) -> None:
    """Set the source stage's damaged final checkpoint aside (never deleted) and train that
    stage again from its newest good checkpoint to its end."""
    with Checkpoints(damaged.directory, save_every=1) as checkpoints:
        where = checkpoints.set_aside(damaged.step)
    log.warning(
        "stage %r cannot start from %s step %d: it does not restore (%s). Moved it to %s; "
        "training stage %r to its end again from its checkpoint before",
        stage.name,
        damaged.directory,
        damaged.step,
        damaged.reason,
        where,
        stage.init.name,
    )
    _run_stage(plan, plan.experiment.stage_index(stage.init.name))


def format_plan(plan: ExperimentPlan) -> str:
    """The plan, stage by stage: what ``--dry_run`` prints and a run logs before it starts."""
    lines = [f"experiment {', '.join(plan.arm_files)} in {plan.root}"]
    for number, stage in enumerate(plan.stages, start=1):
        lines += [
            f"stage {number}/{len(plan.stages)} {stage.name!r}: {stage.run_dir} [{stage.status()}]",
            f"  gin files: {', '.join(stage.gin_files)}",
            f"  runner bindings: {'; '.join(stage.runner_bindings)}",
            f"  mixture: {_mixture_text(stage.mixture)}",
            f"  tokens: {stage.budget.derivation()}{_scaled_text(stage, plan.scale)}",
            f"  warmup: {stage.warmup.derivation() if stage.warmup else 'as its gin files set'}",
            f"  LR: {stage.first_lr:.6g} at its first step -> {stage.last_lr:.6g} at its last"
            + (f" (start: {stage.start_lr_source})" if stage.start_lr_source else ""),
            f"  init: {_init_text(stage)}",
        ]
    return "\n".join(lines)


def _scaled_text(stage: StagePlan, scale: Scale) -> str:
    if scale.token_divisor == 1:
        return ""
    return f"; {short_tokens(stage.full_tokens)} at full scale / {scale.token_divisor:,g}"


def _init_text(stage: StagePlan) -> str:
    if stage.init is None:
        return "from scratch"
    what = "params and optimizer state" if stage.with_optimizer else "params"
    return (
        f"{what} from stage {stage.init.name!r} at step {stage.init.budget.steps:,} "
        f"({stage.init.run_dir})"
    )


def _mixture_text(mixture: tuple[tuple[int, dict[str, float]], ...]) -> str:
    def shares(values: dict[str, float]) -> str:
        return ", ".join(f"{name} {share:g}" for name, share in values.items() if share)

    if len(mixture) == 1:
        return shares(mixture[0][1])
    return "; ".join(f"from step {start:,}: {shares(values)}" for start, values in mixture)
