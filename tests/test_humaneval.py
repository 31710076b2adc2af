"""HumanEval scoring: the harness passes every canonical solution and fails wrong ones; pass@k
matches hand-computed values; evaluate_humaneval truncates, samples n rounds and reports."""

import logging
import math
import time
from fractions import Fraction

import pytest

from codemix_jax.eval.humaneval import (
    HUMANEVAL_LIMITS,
    build_program,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
    score_completions,
    truncate,
)


def test_all_164_canonical_solutions_pass():
    problems = load_problems()
    assert len(problems) == 164
    start = time.monotonic()
    report = score_completions(problems, [[p["canonical_solution"]] for p in problems])
    failed = [(p["task_id"], p["samples"][0]) for p in report["problems"] if p["correct"] != 1]
    assert not failed
    assert report["pass@1"] == 1.0 and report["n_samples"] == 1
    assert "pass@10" not in report
    print(f"164 canonical solutions scored in {time.monotonic() - start:.1f} s")


def test_wrong_completions_fail_with_their_error():
    problems = load_problems(limit=3)
    wrong = [["    return None\n"], ["    return (\n"], ["    while True:\n        pass\n"]]
    report = score_completions(problems, wrong, limits=HUMANEVAL_LIMITS._replace(cpu_s=1))
    samples = [p["samples"][0] for p in report["problems"]]
    assert [s["status"] for s in samples] == ["failed", "failed", "timeout"]
    assert samples[0]["error"] == "AssertionError"
    assert samples[1]["error"].startswith("SyntaxError")
    assert report["pass@1"] == 0.0


@pytest.mark.parametrize(("k", "expected"), [(1, 0.4), (2, 0.7), (3, 0.9), (5, 1.0)])
def test_pass_at_k_hand_computed(k, expected):
    # n = 5 samples, c = 2 correct: 1 - C(3, k) / C(5, k) = 1 - (3, 3, 1, 0) / (5, 10, 10, 1).
    assert pass_at_k(5, 2, k) == pytest.approx(expected)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    exact = 1 - Fraction(math.comb(200 - 13, 100), math.comb(200, 100))
    assert pass_at_k(200, 13, 100) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_truncate_at_the_first_top_level_statement():
    body = "    return a + b\n"
    assert truncate(body) == body
    for tail in ("\ndef helper():\n", "\nclass A:\n", "\nif __name__ == '__main__':\n"):
        assert truncate(body + tail) == body
    assert truncate(body + "\nprint(add(1, 2))\n#\n") == body
    assert truncate(body + "\n# a comment\ndef g(): pass\n") == body
    assert (
        truncate("    # indented comments stay\n" + body) == "    # indented comments stay\n" + body
    )


def test_build_program_is_the_official_layout():
    problem = load_problems(limit=1)[0]
    program = build_program(problem, "    pass\n")
    assert program.startswith(problem["prompt"] + "    pass\n\n" + problem["test"])
    assert program.endswith(f"\ncheck({problem['entry_point']})\n")


def test_evaluate_humaneval_samples_truncates_and_reports(caplog):
    problems = load_problems(limit=3)
    rounds = iter(
        [
            # Right, then something after the function that would fail if it were kept.
            [
                p["canonical_solution"] + "\ndef extra():\n    pass\nraise SystemExit(1)\n"
                for p in problems
            ],
            ["    return None\n"] * 3,
        ]
    )
    prompts_seen = []

    def complete(prompts: list[str]) -> list[str]:
        prompts_seen.append(prompts)
        return next(rounds)

    with caplog.at_level(logging.INFO, logger="codemix_jax.eval.humaneval"):
        report = evaluate_humaneval(
            complete=complete, n_samples=2, ks=(1, 2, 10), limit=3, progress_every=2
        )
    assert prompts_seen == [[p["prompt"] for p in problems]] * 2
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == 1.0
    assert "pass@10" not in report and report["n_samples"] == 2
    assert [p["correct"] for p in report["problems"]] == [1, 1, 1]
    assert "raise SystemExit" not in report["problems"][0]["samples"][0]["completion"]
    assert "humaneval: 2 samples scored" in caplog.text
    assert "humaneval: pass@1 0.5000, pass@2 1.0000 over 3 problems" in caplog.text
