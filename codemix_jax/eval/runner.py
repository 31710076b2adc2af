"""`codemix eval`: tasks over checkpoints, one record per (checkpoint, task), resumable.

A target is one run directory or an experiment root (every stage folder under it); the steps are
one step, the newest, or every kept checkpoint. A checkpoint is loaded only if some task has no
record for it yet, so rerunning the same command after an interruption, or after more
checkpoints were kept, does only the missing work.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from codemix_jax.checkpoint import checkpoint_dir
from codemix_jax.data import load_vocab
from codemix_jax.eval import humaneval, multiple_choice, records
from codemix_jax.eval.loglikelihood import LoglikelihoodScorer
from codemix_jax.eval.sampling import SamplingSettings, sampler_for
from codemix_jax.trained import TrainedModel, TrainedModelError, load_trained, saved_run

log = logging.getLogger(__name__)


class EvalTask(Protocol):
    """One evaluation: its record name, and its metrics, item count and details on a model."""

    name: str

    def run(self, trained: TrainedModel) -> tuple[dict[str, float], int, dict[str, Any]]: ...


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
    """A JSONL multiple-choice file scored zero-shot by log-likelihood (eval/multiple_choice)."""

    path: str
    rows: int = 16

    @property
    def name(self) -> str:
        return f"mc_{multiple_choice.task_name(self.path)}"

    def run(self, trained: TrainedModel) -> tuple[dict[str, float], int, dict[str, Any]]:
        items = multiple_choice.read_task(self.path)
        scorer = LoglikelihoodScorer(
            model=trained.model,
            params=trained.params,
            mesh=trained.mesh,
            rules=trained.rules,
            rows=self.rows,
        )
        scores = multiple_choice.choice_loglikelihoods(
            items, scorer=scorer, vocab=load_vocab(trained.vocab_path)
        )
        details = {"task_file": os.path.abspath(self.path), "loglikelihoods": scores}
        return multiple_choice.accuracy(items, scores), len(items), details


@dataclasses.dataclass(frozen=True)
class HumanEvalTask:
    """The 164 HumanEval problems, ``n_samples`` completions each, run in the sandbox."""

    n_samples: int = 1
    settings: SamplingSettings = dataclasses.field(
        default_factory=lambda: SamplingSettings(max_new_tokens=256)
    )
    ks: tuple[int, ...] = (1, 10, 100)
    limit: int | None = None  # the first N problems only (a quick look); None = all 164

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"--n_samples={self.n_samples} must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"--ks={','.join(map(str, self.ks))}: each k must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit={self.limit} must be >= 1")

    @property
    def name(self) -> str:
        return "humaneval" if self.limit is None else f"humaneval_first{self.limit}"

    def run(self, trained: TrainedModel) -> tuple[dict[str, float], int, dict[str, Any]]:
        sampler, vocab = sampler_for(trained), load_vocab(trained.vocab_path)
        rounds = itertools.count()

        def complete(prompts: list[str]) -> list[str]:
            # Each round its own seed: n samples of a problem are n draws, not one drawn n times.
            settings = dataclasses.replace(self.settings, seed=self.settings.seed + next(rounds))
            return sampler.complete(prompts, settings, vocab)

        summary = humaneval.evaluate_humaneval(
            complete=complete, n_samples=self.n_samples, ks=self.ks, limit=self.limit
        )
        metrics = {key: value for key, value in summary.items() if key.startswith("pass@")}
        details = {"settings": dataclasses.asdict(self.settings), "problems": summary["problems"]}
        return metrics, len(summary["problems"]), details


def humaneval_tasks(args: Any) -> list[EvalTask]:
    """The task `codemix eval humaneval` describes with its flags."""
    temperature = args.temperature
    if temperature is None:  # one sample: greedy; several: the Codex paper's T for pass@k
        temperature = 0.0 if args.n_samples == 1 else 0.8
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    ks = tuple(int(k) for k in args.ks.split(","))
    return [HumanEvalTask(n_samples=args.n_samples, settings=settings, ks=ks, limit=args.limit)]


def multiple_choice_tasks(args: Any) -> list[EvalTask]:
    """The ``--task`` files of `codemix eval mc` (every shipped task without one)."""
    names = args.task or multiple_choice.shipped()
    return [MultipleChoiceTask(multiple_choice.task_path(name)) for name in names]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    run_dir: str
    step: int


def stage_dirs(root: str) -> list[str]:
    """The run directories of an experiment root: its sub-folders that hold checkpoints."""
    if not os.path.isdir(root):
        raise TrainedModelError(f"experiment root {root!r} is not a directory")
    found = sorted(
        os.path.join(root, name)
        for name in os.listdir(root)
        if os.path.isdir(checkpoint_dir(os.path.join(root, name)))
    )
    if not found:
        raise TrainedModelError(f"{root!r} has no stage folders with checkpoints")
    return found


def checkpoints_to_evaluate(
    run_dirs: Sequence[str], *, step: int | None = None, all_steps: bool = False
) -> list[Checkpoint]:
    """``step`` (or the newest) of each run, or every kept checkpoint with ``all_steps``."""
    chosen = []
    for run_dir in run_dirs:
        run = saved_run(run_dir)
        steps = run.steps()
        if not steps:
            raise TrainedModelError(f"{run.directory} holds no finished checkpoint")
        if all_steps:
            chosen.extend(Checkpoint(run_dir, s) for s in sorted(steps))
        elif step is None:
            chosen.append(Checkpoint(run_dir, max(steps)))
        elif step in steps:
            chosen.append(Checkpoint(run_dir, step))
        else:
            raise TrainedModelError(
                f"{run.directory} has no checkpoint at step {step}; it has {steps}"
            )
    return chosen


def evaluate(
    *,
    tasks: Sequence[EvalTask],
    checkpoints: Sequence[Checkpoint],
    vocab_path: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Runs every task on every checkpoint that has no record of it yet; returns the records
    written. Progress: one line per checkpoint and per task."""
    written = []
    for number, checkpoint in enumerate(checkpoints, start=1):
        where = f"[{number}/{len(checkpoints)}] {checkpoint.run_dir} step {checkpoint.step}"
        todo = [
            task
            for task in tasks
            if overwrite or not records.has_record(checkpoint.run_dir, checkpoint.step, task.name)
        ]
        if not todo:
            log.info("%s: every task already has a record", where)
            continue
        trained = load_trained(checkpoint.run_dir, step=checkpoint.step, vocab_path=vocab_path)
        for task in todo:
            start = time.monotonic()
            metrics, n, details = task.run(trained)
            path = records.write_record(
                trained, task=task.name, metrics=metrics, n=n, details=details
            )
            shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
            log.info(
                "%s: %s (n=%d) %s in %.1f s -> %s",
                where,
                task.name,
                n,
                shown,
                time.monotonic() - start,
                path,
            )
            written.append(path)
    return written
