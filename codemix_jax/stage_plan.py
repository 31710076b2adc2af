"""One stage of an arm made concrete: the gin config it trains with, its steps from its token
budget, its LR at its first and last step, where it starts from, and what its run dir holds.

Everything comes from the stage's real gin config (the same objects ``train()`` will get), so the
plan of a full-scale arm can be checked on any host: nothing here reads data or writes files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from codemix_jax import gin_config, run_dir
from codemix_jax.budget import Budget, token_budget, warmup_budget
from codemix_jax.checkpoint import CheckpointMismatchError, check_same_run, run_identity
from codemix_jax.data import MixtureInput
from codemix_jax.model import ModelConfig
from codemix_jax.stages import PREVIOUS, Experiment, Stage


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage as it will run (or ran): config, budget, LRs, init link and status on disk."""

    name: str
    run_dir: str
    gin_files: tuple[str, ...]
    own_bindings: tuple[str, ...]  # the stage's, then the command line's
    runner_bindings: tuple[str, ...]  # NUM_STEPS, WARMUP_STEPS, START_LR, init_from: parsed last
    full_tokens: float  # the arm's budget before the scale divides it
    budget: Budget
    warmup: Budget | None
    mixture: tuple[tuple[int, dict[str, float]], ...]  # (first step, shares) per phase
    first_lr: float
    last_lr: float
    start_lr_source: str  # where START_LR came from; '' when the stage sets none
    init: StagePlan | None  # the stage it starts from (its plan); None = from scratch
    with_optimizer: bool
    latest_step: int | None  # newest checkpoint in run_dir

    @property
    def bindings(self) -> tuple[str, ...]:
        return (*self.own_bindings, *self.runner_bindings)

    @property
    def finished(self) -> bool:
        return self.latest_step == self.budget.steps

    def status(self) -> str:
        if self.latest_step is None:
            return "new"
        if self.finished:
            return "finished"
        return f"partial: checkpoint at step {self.latest_step:,} of {self.budget.steps:,}"


def plan_stage(
    experiment: Experiment,
    index: int,
    *,
    arm_files: Sequence[str],
    cli_bindings: Sequence[str],
    token_divisor: float,
    root: str,
    earlier: Sequence[StagePlan],
) -> StagePlan:
    """Plan stage ``index``; ``earlier`` are the plans of the stages before it, in order.

    ``arm_files`` (the arm's, then its scale's) are parsed first, then the stage's files, its
    bindings, ``cli_bindings`` and the runner's bindings. Budgets are divided by
    ``token_divisor``. Leaves the stage's gin config parsed, ready for ``train()``.
    """
    stage = experiment.stages[index]
    what = f"stage {stage.name!r}"
    init_index = experiment.init_index(index)
    init = None if init_index is None else earlier[init_index]
    files = (*arm_files, *stage.gin_files)
    own = (*stage.bindings, *cli_bindings)
    gin_config.parse(files, own)  # The batch, which turns tokens into steps.
    budget, warmup = _budgets(stage, token_divisor, what)
    start_lr, start_lr_source = _start_lr(stage.start_lr, init)
    runner = _runner_bindings(budget, warmup, start_lr, init, stage.with_optimizer)
    gin_config.parse(files, (*own, *runner))
    dataset = MixtureInput()
    first_lr, last_lr = _checked_learning_rates(what, budget.steps, start_lr)
    stage_dir = os.path.join(root, stage.name)
    latest = run_dir.latest_step(stage_dir)
    if latest is not None:
        _check_checkpoint(what, stage_dir, latest, budget.steps, dataset)
    return StagePlan(
        name=stage.name,
        run_dir=stage_dir,
        gin_files=files,
        own_bindings=own,
        runner_bindings=runner,
        full_tokens=stage.tokens,
        budget=budget,
        warmup=warmup,
        mixture=dataset.schedule,
        first_lr=first_lr,
        last_lr=last_lr,
        start_lr_source=start_lr_source,
        init=init,
        with_optimizer=stage.with_optimizer,
        latest_step=latest,
    )


def require_finished_init(plan: StagePlan) -> None:
    """A stage may only start from a stage that reached its last step (read from disk now)."""
    init = plan.init
    if init is None:
        return
    latest = run_dir.latest_step(init.run_dir)
    if latest != init.budget.steps:
        found = "no checkpoint" if latest is None else f"its newest checkpoint is step {latest:,}"
        raise ValueError(
            f"stage {plan.name!r} starts from stage {init.name!r}, which has not finished: "
            f"{found} of {init.budget.steps:,} in {init.run_dir}; run stage {init.name!r} first"
        )


def _budgets(stage: Stage, token_divisor: float, what: str) -> tuple[Budget, Budget | None]:
    """The stage's steps and warmup steps, at ``global_batch_size x seq_len`` tokens a step."""
    batch = gin_config.bound("MixtureInput.global_batch_size", what=what)
    tokens_per_step = batch * gin_config.bound("MixtureInput.seq_len", what=what)
    budget = token_budget(stage.tokens / token_divisor, tokens_per_step=tokens_per_step, what=what)
    if stage.warmup_tokens is None:
        return budget, None
    warmup = stage.warmup_tokens / token_divisor
    return budget, warmup_budget(warmup, tokens_per_step=tokens_per_step, what=what)


def _start_lr(start_lr: float | str | None, init: StagePlan | None) -> tuple[float | None, str]:
    """START_LR and where it came from: the init stage's logged last LR once it finished (its
    schedule's last LR until then), or a given value."""
    if start_lr is None:
        return None, ""
    if start_lr != PREVIOUS:
        return float(start_lr), "given"
    if init.finished:
        logged = run_dir.logged_learning_rate(init.run_dir, init.budget.steps)
        if logged is None:
            raise ValueError(
                f"stage {init.name!r} finished but {init.run_dir}/metrics.jsonl has no record of "
                f"its last step {init.budget.steps}, whose LR the next stage starts from"
            )
        return logged, f"the LR stage {init.name!r} logged at its last step"
    return init.last_lr, (
        f"stage {init.name!r}'s schedule at its last step; read from its metrics once it has run"
    )


def _runner_bindings(
    budget: Budget,
    warmup: Budget | None,
    start_lr: float | None,
    init: StagePlan | None,
    with_optimizer: bool,
) -> tuple[str, ...]:
    bindings = [f"NUM_STEPS = {budget.steps}"]
    if warmup is not None:
        bindings.append(f"WARMUP_STEPS = {warmup.steps}")
    if start_lr is not None:
        bindings.append(f"START_LR = {start_lr!r}")
    if init is not None:
        bindings += [
            "train.init_from = @InitFrom()",
            f"InitFrom.run_dir = {init.run_dir!r}",
            f"InitFrom.step = {init.budget.steps}",
            f"InitFrom.with_optimizer = {with_optimizer}",
        ]
    return tuple(bindings)


def _checked_learning_rates(
    what: str, num_steps: int, start_lr: float | None
) -> tuple[float, float]:
    """The LR at the first and the last step (step s trains with schedule(s - 1)), once the run's
    length and first LR are seen to be the ones the runner bound."""
    bound_steps = gin_config.bound("train.num_steps", what=what)
    if bound_steps != num_steps:
        raise ValueError(
            f"{what}: train.num_steps is {bound_steps}, not the {num_steps} "
            "steps of its token budget; bind train.num_steps = %NUM_STEPS (gin/base.gin does)"
        )
    schedule = gin_config.bound("train.learning_rate", what=what)
    first, last = float(schedule(0)), float(schedule(num_steps - 1))
    if start_lr is not None and np.float32(first) != np.float32(start_lr):
        raise ValueError(
            f"{what}: start_lr gives START_LR = {start_lr!r} but its schedule starts at {first!r}; "
            "does its schedule read %START_LR (gin/schedules/linear_anneal.gin)?"
        )
    return first, last


def _check_checkpoint(
    what: str, stage_dir: str, latest: int, num_steps: int, dataset: MixtureInput
) -> None:
    """A stage's checkpoint must be of this stage: not past its budget, and of the same run."""
    if latest > num_steps:
        raise ValueError(
            f"{what}: {stage_dir} holds a checkpoint at step {latest:,}, past this stage's "
            f"{num_steps:,} steps; was its token budget or batch changed? Use another --root"
        )
    identity = run_identity(
        model_config=ModelConfig(),
        input_settings=dataset.stream_settings(),
        seed=gin_config.bound("train.seed", what=what, default=0),
    )
    try:
        check_same_run(run_dir.saved_identity(stage_dir, latest), identity, latest)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{what} in {stage_dir}: {error}") from error
