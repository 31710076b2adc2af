"""Zero-shot multiple-choice tasks scored by log-likelihood: the JSONL format, accuracy raw and
length-normalised.

A task file has one JSON object per line: ``{"context": str, "choices": [str, ...], "answer":
int}`` (``answer`` indexes ``choices``; other keys, such as an ``id``, are kept but unused). A
choice is scored by log p(choice | context); the prediction is the best choice by that sum
(``acc``) and by that sum per character of the choice (``acc_norm``, which does not favour short
choices), the two numbers lm-evaluation-harness reports as acc and acc_norm.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import seqio

from codemix_jax.eval.loglikelihood import LoglikelihoodScorer, split_pair

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


class TaskFileError(ValueError):
    """A task file that is missing, not JSONL, or has a row without valid fields."""


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int


def shipped() -> list[str]:
    """The names of the task files shipped in ``eval/tasks``."""
    return sorted(name.removesuffix(".jsonl") for name in os.listdir(TASKS_DIR))


def task_path(name_or_path: str) -> str:
    """A task file by path, or by the name of one shipped in ``eval/tasks`` (``"arithmetic"``)."""
    if os.path.exists(name_or_path):
        return name_or_path
    named = os.path.join(TASKS_DIR, f"{name_or_path}.jsonl")
    if os.path.exists(named):
        return named
    raise TaskFileError(f"task file {name_or_path!r} not found (shipped tasks: {shipped()})")


def task_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".jsonl")


def read_task(path: str) -> list[Item]:
    """Every item of the task file; a bad row is refused with its line number and what is wrong."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                items.append(_item(line, f"{path}:{number}"))
    if not items:
        raise TaskFileError(f"{path} has no items")
    return items


def _item(line: str, where: str) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskFileError(f"{where}: not JSON ({error})") from None
    if not isinstance(row, dict):
        raise TaskFileError(f"{where}: expected an object, got {type(row).__name__}")
    context, choices, answer = row.get("context"), row.get("choices"), row.get("answer")
    if not isinstance(context, str) or not context:
        raise TaskFileError(f"{where}: 'context' must be a non-empty string, got {context!r}")
    if not (
        isinstance(choices, list)
        and len(choices) >= 2
        and all(isinstance(c, str) and c for c in choices)
    ):
        raise TaskFileError(
            f"{where}: 'choices' must be a list of two or more non-empty strings, got {choices!r}"
        )
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise TaskFileError(
            f"{where}: 'answer' must index the {len(choices)} choices, got {answer!r}"
        )
    return Item(context=context, choices=tuple(choices), answer=answer)


def choice_loglikelihoods(
    items: Sequence[Item], *, scorer: LoglikelihoodScorer, vocab: seqio.Vocabulary
) -> list[list[float]]:
    """log p(choice | context) of every choice of every item, all scored in one batched pass."""
    requests = [
        split_pair(vocab, item.context, choice) for item in items for choice in item.choices
    ]
    flat = iter(scorer.loglikelihoods(requests))
    return [[next(flat) for _ in item.choices] for item in items]


def accuracy(items: Sequence[Item], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, float]:
    """``acc`` (best sum) and ``acc_norm`` (best sum per character of the choice)."""
    raw = [
        int(np.argmax(scores)) == item.answer
        for item, scores in zip(items, loglikelihoods, strict=True)
    ]
    norm = [
        int(np.argmax(np.asarray(scores) / [len(c) for c in item.choices])) == item.answer
        for item, scores in zip(items, loglikelihoods, strict=True)
    ]
    return {"acc": float(np.mean(raw)), "acc_norm": float(np.mean(norm))}
