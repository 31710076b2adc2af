"""Soak: kill a training run again and again, resume it each time, and compare with a run never
killed.

Each round starts `codemix train` on the same run dir, waits for a random step, and sends SIGKILL
or SIGTERM (alternating at random), sometimes right after a checkpoint step, while its save is
still being written. The last round runs to the end. The run passes when its metrics.jsonl holds
every step exactly once and every record equals the uninterrupted run's, bit for bit (timings
aside).

    .venv/bin/python bench/soak.py [--kills 12] [--steps 120] [--seed 0] [--dir /tmp/soak]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 5
TIMING_KEYS = {"tokens_per_second", "step_time_s", "mfu"}


def train_command(run_dir: Path, *, steps: int, corpus_dir: str, vocab_path: str) -> list[str]:
    bindings = [
        f"local_sources.corpus_dir = '{corpus_dir}'",
        f"MixtureInput.vocab_path = '{vocab_path}'",
        f"NUM_STEPS = {steps}",
        "WARMUP_STEPS = 5",
        "MixtureInput.global_batch_size = 8",
        "MixtureInput.seq_len = 64",
        "train.log_every = 1",
        f"train.checkpoint_every = {CHECKPOINT_EVERY}",
    ]
    flags = [flag for binding in bindings for flag in ("--gin_bindings", binding)]
    return [
        *(sys.executable, "-m", "codemix_jax", "train", "--gin_file", "gin/experiments/smoke.gin"),
        *("--run_dir", str(run_dir), *flags),
    ]


@dataclasses.dataclass
class Round:
    signal: str  # "" for the last round, run to the end
    at_step: int  # the step whose log line triggered the signal
    during_save: bool
    resumed_from: int  # the step the round started after (0: fresh)
    exit_code: int
    seconds: float


def logged_steps(log_path: Path) -> list[int]:
    """Steps in the progress lines ("step N/M ...") of a round's log."""
    steps = []
    for line in log_path.read_text().splitlines():
        if (at := line.find(" step ")) >= 0 and "/" in line[at + 6 : at + 20]:
            head = line[at + 6 :].split("/")[0]
            if head.isdigit():
                steps.append(int(head))
    return steps


def run_round(command: list[str], log_path: Path, stop: tuple[int, int] | None) -> tuple[int, int]:
    """Run until ``stop = (step, signal)`` is due, send it; returns (exit code, step signalled)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if stop is None:
        return process.wait(), 0
    target, signum = stop
    while process.poll() is None:
        seen = logged_steps(log_path)
        if seen and seen[-1] >= target:
            process.send_signal(signum)
            return process.wait(), seen[-1]
        time.sleep(0.02)
    return process.returncode, 0


def soak(*, kills: int, steps: int, seed: int, directory: Path, corpus: str, vocab: str) -> dict:
    rng = random.Random(seed)
    command = {
        name: train_command(directory / name, steps=steps, corpus_dir=corpus, vocab_path=vocab)
        for name in ("straight", "killed")
    }
    start = time.perf_counter()
    code, _ = run_round(command["straight"], directory / "straight.log", None)
    assert code == 0, (directory / "straight.log").read_text()[-3000:]
    straight_seconds = time.perf_counter() - start

    rounds: list[Round] = []
    for index in range(kills + 1):
        resumed_from = _latest_checkpoint(directory / "killed")
        stop = None
        if index < kills:  # spread the kills over what is left of the run
            span = max(2, (steps - resumed_from) // (kills - index + 1))
            target = min(resumed_from + rng.randint(1, span), steps - 1)
            if rng.random() < 0.4:  # a checkpoint step: signalled as its save begins
                target = max(CHECKPOINT_EVERY, target // CHECKPOINT_EVERY * CHECKPOINT_EVERY)
            stop = (target, rng.choice([signal.SIGKILL, signal.SIGTERM]))
        start = time.perf_counter()
        log_path = directory / f"round_{index}.log"
        code, at_step = run_round(command["killed"], log_path, stop)
        rounds.append(
            Round(
                signal=signal.Signals(stop[1]).name if stop else "",
                at_step=at_step,
                during_save=bool(stop) and at_step % CHECKPOINT_EVERY == 0,
                resumed_from=resumed_from,
                exit_code=code,
                seconds=time.perf_counter() - start,
            )
        )
        print(json.dumps(dataclasses.asdict(rounds[-1])), flush=True)
    return {
        "straight_seconds": straight_seconds,
        "rounds": rounds,
        "verdict": compare(directory / "straight", directory / "killed", steps),
    }


def _latest_checkpoint(run_dir: Path) -> int:
    found = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(found, default=0)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def compare(straight: Path, killed: Path, steps: int) -> str:
    """ "ok", or what differs: a step missing or doubled, or a record unlike the straight run's."""
    ours, theirs = records(killed), records(straight)
    logged = [record["step"] for record in ours]
    if logged != list(range(1, steps + 1)):
        doubled = sorted({s for s in logged if logged.count(s) > 1})
        missing = sorted(set(range(1, steps + 1)) - set(logged))
        return f"steps doubled {doubled}, missing {missing}"
    for record, expected in zip(ours, theirs, strict=True):
        if record != expected:
            return f"step {record['step']} differs: {record} vs {expected}"
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus_dir", default="data/local/corpus")
    parser.add_argument("--vocab_path", default="data/local/spm.model")
    parser.add_argument("--dir", default=None, help="run dirs go here (default: a temp dir)")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="soak_"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    result = soak(
        kills=args.kills,
        steps=args.steps,
        seed=args.seed,
        directory=directory,
        corpus=os.path.abspath(args.corpus_dir),
        vocab=os.path.abspath(args.vocab_path),
    )
    rounds = result["rounds"]
    signals = [r.signal for r in rounds if r.signal]
    print(
        f"{len(signals)} kills ({signals.count('SIGKILL')} SIGKILL, {signals.count('SIGTERM')} "
        f"SIGTERM, {sum(r.during_save for r in rounds)} at a checkpoint step), "
        f"{sum(r.seconds for r in rounds):.0f} s in all rounds vs {result['straight_seconds']:.0f} "
        f"s straight; exit codes {[r.exit_code for r in rounds]}; verdict: {result['verdict']}"
    )
    sys.exit(0 if result["verdict"] == "ok" else 1)


if __name__ == "__main__":
    main()
