"""An experiment arm in gin: its chain of stages and the scales it can run at.

An arm file is a ``codemix train`` config shared by all its stages (base, model, sources,
optimizer) that also binds ``experiment.stages``. Each ``Stage`` adds its own gin files and
bindings (mixture, schedule) and a token budget, so every stage is an ordinary training run that
``codemix train`` could run alone; ``codemix experiment`` runs them in order, each one starting
from the checkpoint of the stage it continues.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import gin

PREVIOUS = "previous"
FULL = "full"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run of an arm.

    Attributes:
      name: its run directory under the experiment root; other stages' ``init`` use it.
      tokens: how many tokens it trains (steps = tokens / (batch x seq_len), rounded).
      gin_files: parsed after the arm file and the scale's files (mixture, schedule, ...).
      bindings: parsed after every file, before the runner's own bindings.
      warmup_tokens: if set, the runner binds ``WARMUP_STEPS`` to these tokens in whole steps.
      init: where its params come from: 'previous' (the stage before it; from scratch for the
        first stage), the name of an earlier stage, or None (from scratch).
      with_optimizer: take the init stage's optimizer state too (a continuation, e.g. a cooldown),
        not a fresh one (a new run that starts from a checkpoint).
      start_lr: if set, the runner binds ``START_LR`` (read by gin/schedules/linear_anneal.gin):
        a float, or 'previous' for the LR the init stage logged at its last step.
    """

    name: str
    tokens: float
    gin_files: Sequence[str] = ()
    bindings: Sequence[str] = ()
    warmup_tokens: float | None = None
    init: str | None = PREVIOUS
    with_optimizer: bool = False
    start_lr: float | str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\w+", self.name):
            raise ValueError(f"stage name must be letters, digits, underscores; got {self.name!r}")
        if isinstance(self.start_lr, str) and self.start_lr != PREVIOUS:
            raise ValueError(
                f"stage {self.name!r}: start_lr must be a float or {PREVIOUS!r}, "
                f"got {self.start_lr!r}"
            )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Scale:
    """A whole arm at another size: more files for every stage, and budgets divided.

    Attributes:
      gin_files: parsed right after the arm file, both when the stage list is read and before
        each stage's own files: a smaller model, local data, a smaller batch, and macros that
        the stages read.
      token_divisor: every stage's ``tokens`` and ``warmup_tokens`` are divided by this.
    """

    gin_files: Sequence[str] = ()
    token_divisor: float = 1.0

    def __post_init__(self) -> None:
        if not self.token_divisor > 0:
            raise ValueError(f"Scale.token_divisor must be > 0, got {self.token_divisor}")


@gin.configurable("experiment")
@dataclasses.dataclass(frozen=True)
class Experiment:
    """An arm: ``stages`` run in order, at scale 'full' (the files as written) or a named one.

    Attributes:
      stages: the chain; each stage's run dir is ``<root>/<name>``.
      scales: named scales besides 'full', e.g. {'tiny': @tiny/Scale()}.
    """

    stages: Sequence[Stage]
    scales: Mapping[str, Scale] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        if not names:
            raise ValueError("experiment.stages is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for index in range(len(self.stages)):
            self.init_index(index)  # Names a missing, later or absent init stage.

    def stage_index(self, name: str) -> int:
        names = [stage.name for stage in self.stages]
        if name not in names:
            raise ValueError(f"no stage {name!r} in this experiment; its stages are {names}")
        return names.index(name)

    def init_index(self, index: int) -> int | None:
        """Index of the stage that stage ``index`` starts from; None = from scratch."""
        stage = self.stages[index]
        if stage.init == PREVIOUS:
            init = index - 1 if index else None
        elif stage.init is None:
            init = None
        else:
            names = [other.name for other in self.stages]
            if stage.init not in names:
                raise ValueError(
                    f"stage {stage.name!r} starts from stage {stage.init!r}, which this "
                    f"experiment does not have; its stages are {names}"
                )
            init = names.index(stage.init)
            if init >= index:
                raise ValueError(
                    f"stage {stage.name!r} starts from {stage.init!r}, which is not an earlier "
                    "stage; a stage can only continue a stage run before it"
                )
        if init is None and stage.start_lr == PREVIOUS:
            raise ValueError(
                f"stage {stage.name!r}: start_lr='previous' needs a stage to continue, but it "
                "starts from scratch"
            )
        return init

    def scale(self, name: str) -> Scale:
        if name == FULL:
            return Scale()
        if name not in self.scales:
            raise ValueError(f"unknown scale {name!r}; this experiment has {[FULL, *self.scales]}")
        return self.scales[name]
