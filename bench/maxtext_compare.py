"""codemix vs MaxText on this CPU: the same model's train step, side by side, in one run.

The model (issue 7): a Llama-style block (pre-norm RMSNorm, RoPE, SwiGLU, no biases), 4 layers,
d_model 256, 4 heads x 64, MLP 1024, vocabulary 32000 with an untied head, seq 256, batch 8,
float32, one device, AdamW with global-norm clipping. Each system builds it its own way (codemix
from ``ModelConfig``, MaxText from its ``base.yml`` overrides) and each runs with its own defaults
for everything else (scan, remat, attention, loss); both are reported.

What one run does:
  1. finds a Python >= 3.12 (MaxText needs one) and builds, or reuses, MaxText's venv under
     ``.bench/`` (MaxText from PyPI plus the GPU-free "decoupled" requirements shipped in its
     wheel; nothing else is downloaded, and MaxText reads synthetic data);
  2. ``--rounds`` times, in alternating order: the f32 matmul rate (``matmul_rate.py``, in both
     venvs: their JAX versions differ), codemix's step (``codemix_worker.py``) and MaxText's step
     (``maxtext_worker.py``), each in a fresh process;
  3. once: where codemix's step spends its time (``codemix_worker.py breakdown``: its parts, and
     the step with the layers unrolled and with the other loss) and, when the demo corpus exists
     (``make data``), what the input iterator costs;
  4. prints the median step time after warm-up, tokens/s, the ratio, each system's model FLOP rate
     as a share of the matmul rate, and whether issue 7's targets are met.

    .venv/bin/python bench/maxtext_compare.py [--steps 10] [--rounds 3] [--json out.json]
        [--maxtext_set remat_policy=minimal]   # any MaxText config override, repeatable
        [--same_jax]                           # also codemix on MaxText's JAX, as a control

Run it on a quiet machine: both systems use every core, and another process's load shows up as
slower steps (the load average is printed with every round).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MAXTEXT_VERSION = "0.2.5"
DEFAULT_VENV = REPO / ".bench" / "maxtext-venv"
# MaxText's wheel ships pinned requirement sets; the "decoupled" one leaves out Google Cloud
# clients and accelerator wheels. What remains for GPUs only is dropped too: this is a CPU run.
REQUIREMENTS = "dependencies/requirements/generated_requirements/decoupled-requirements.txt"
GPU_ONLY = re.compile(r"^(nvidia-|cuda-|apache-tvm-ffi)")
TARGET_RATIO = 1.2  # codemix tokens/s over MaxText's
TARGET_MATMUL_SHARE = 0.5  # codemix model FLOP/s over the measured f32 matmul rate


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Python >= 3.12 and MaxText's venv


def python_version(executable: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter, or None if it does not run."""
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = out.split()
    return int(major), int(minor)


def find_python(explicit: str | None) -> tuple[str | None, list[str]]:
    """A Python >= 3.12 for MaxText: ``--python``, else pyenv's versions and PATH, preferring
    3.13 and 3.12 (what MaxText's wheels are built for), then the newest. Also returns where
    it looked, for the message when there is none."""
    if explicit:
        return (explicit if (python_version(explicit) or (0, 0)) >= (3, 12) else None), [explicit]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin", "python3")))
    for minor in range(12, 20):
        found = shutil.which(f"python3.{minor}")
        if found:
            candidates.append(found)
    candidates.append(shutil.which("python3") or "python3")
    usable = []
    for candidate in candidates:
        version = python_version(candidate)
        if version and version >= (3, 12):
            preferred = version in ((3, 13), (3, 12))
            usable.append((not preferred, tuple(-v for v in version), candidate))
    return (min(usable)[2] if usable else None), candidates


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def pip_install(venv: Path, *requirements: str) -> None:
    """``pip install`` into ``venv``; its output goes to ``.bench/pip.log`` (printed on failure)."""
    command = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    pip_log = venv.parent / "pip.log"
    with pip_log.open("a") as out:
        done = subprocess.run([*command, *requirements], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(
            f"pip install failed; the end of {pip_log}:\n{pip_log.read_text()[-4000:]}"
        )


def ensure_maxtext_venv(python: str, venv: Path, version: str) -> None:
    """Create (or reuse) ``venv`` with ``maxtext==version`` and its CPU requirements.

    A marker file records what was installed, so a later run reuses the venv without asking the
    package index anything; a different version or a broken venv is rebuilt.
    """
    marker = venv / "codemix-bench.json"
    wanted = {"maxtext": version, "python": python}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        check = subprocess.run(
            [venv_python(venv), "-c", "import maxtext, jax, flax, optax"],
            capture_output=True,
            cwd=venv,
            env=worker_env(),
        )
        if check.returncode == 0:
            log(f"MaxText venv: reusing {venv} (maxtext {version})")
            return
    log(f"MaxText venv: building {venv} with {python} (maxtext {version}; a few minutes)")
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip_install(venv, f"maxtext=={version}")
    site = subprocess.run(
        [venv_python(venv), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = Path(site, REQUIREMENTS).read_text().splitlines()
    requirements = [
        line
        for line in lines
        if line.strip() and not line.startswith("#") and not GPU_ONLY.match(line)
    ]
    pip_install(venv, *requirements)
    marker.write_text(json.dumps(wanted))


def ensure_gin(venv: Path) -> None:
    """gin-config in MaxText's venv, the one package codemix's model needs that MaxText lacks.

    Checked from inside the venv folder: from the repository root, its ``gin/`` folder of config
    files would import as an (empty) namespace package and hide that gin-config is missing.
    """
    check = [str(venv_python(venv)), "-c", "import gin; gin.configurable"]
    if subprocess.run(check, capture_output=True, cwd=venv).returncode:
        pip_install(venv, "gin-config")


# ---------------------------------------------------------------------------------------------
# Workers


def worker_env(pythonpath: str | None = None) -> dict[str, str]:
    """The same environment for every worker: CPU only, XLA flags as the user has them except a
    forced host device count (it would split this one CPU into several slower devices)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def run_worker(python: str | Path, script: str, *args: str, pythonpath: str | None = None) -> dict:
    """Run ``bench/<script>`` in a fresh process; its last stdout line is its JSON result."""
    command = [str(python), str(BENCH / script), *args]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env=worker_env(pythonpath)
    )
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ---------------------------------------------------------------------------------------------
# Report


def tokens_per_second(result: dict, seconds: float) -> float:
    return result["tokens_per_step"] / seconds


def summarize_system(name: str, runs: list[dict], flops_per_token: float, matmul: float) -> dict:
    """Median step after warm-up over every round's steps, the per-round medians' range, and the
    fastest step (on a busy machine, the one least slowed by other processes)."""
    pooled = [t for run in runs for t in run["step_times_s"]]
    median = statistics.median(pooled)
    per_round = [tokens_per_second(run, statistics.median(run["step_times_s"])) for run in runs]
    rate = tokens_per_second(runs[0], median)
    summary = {
        "median_step_s": median,
        "tokens_per_s": rate,
        "tokens_per_s_per_round": per_round,
        "fastest_step_s": min(pooled),
        "model_gflops": rate * flops_per_token / 1e9,
        "share_of_matmul": rate * flops_per_token / 1e9 / matmul,
    }
    log(
        f"  {name:<8} median step {median:.3f} s  {rate:7.1f} tokens/s (rounds "
        f"{min(per_round):.0f}-{max(per_round):.0f}; fastest step {min(pooled):.3f} s)  "
        f"{summary['model_gflops']:6.1f} GFLOP/s = {summary['share_of_matmul']:.0%} of the "
        "matmul rate"
    )
    return summary


def report_fairness(codemix: dict, maxtext: dict) -> None:
    """Same model, same work: parameters and FLOPs per token as each system counts them."""
    tokens = maxtext["tokens_per_step"]
    # MaxText's count: [total, learnable weights, attention] TFLOPs per device per step; its
    # attention term is causal (half the score matrix), codemix counts the full matrix.
    total, weights, attention = maxtext["maxtext_tflops_per_device_per_step"]
    log("Same model and work?")
    log(f"  parameters:       codemix {codemix['num_params']:,}  MaxText {maxtext['num_params']:,}")
    mega = 1e12 / tokens / 1e6  # TFLOPs per step -> MFLOPs per token
    log(
        f"  FLOPs per token:  codemix {codemix['flops_per_token'] / 1e6:.2f} M (6N + full "
        f"attention)  MaxText {total * mega:.2f} M (6N {weights * mega:.2f} M + causal "
        f"attention {attention * mega:.2f} M)"
    )
    log(f"  tokens per step:  codemix {codemix['tokens_per_step']}  MaxText {tokens}")
    log(f"  devices:          codemix {codemix['devices']}  MaxText {maxtext['devices']}")
    log(
        f"  codemix settings: {codemix['settings']} (python {codemix['python']}, "
        f"jax {codemix['jax']})"
    )
    log(
        f"  MaxText settings: {maxtext['settings']} (maxtext {maxtext['version']}, python "
        f"{maxtext['python']}, jax {maxtext['jax']})"
    )
    if codemix["num_params"] != maxtext["num_params"]:
        log("  WARNING: the parameter counts differ: the two models are not the same")


def report_breakdown(breakdown: dict, matmul: float, head_flops: float) -> dict:
    """Where codemix's step goes: its parts' times, shares and achieved FLOP rates."""
    step = statistics.median(breakdown["step_times_s"])
    parts = breakdown["parts"]
    tokens = breakdown["tokens_per_step"]
    total_flops = breakdown["flops_per_token"] * tokens
    head = head_flops * tokens
    trunk = total_flops - head
    log(f"Where codemix's step goes (one process, parts taking turns; step {step:.3f} s):")
    rows = [
        ("loss forward+backward", parts["loss_grad"], total_flops),
        ("  head + cross-entropy (32000 vocab)", parts["head_grad"], head),
        ("  embedding + 4 layers + final norm", parts["trunk_grad"], trunk),
        ("optimizer (clip + AdamW)", parts["optimizer"], None),
    ]
    for label, seconds, flops in rows:
        gflops = flops / seconds / 1e9 if flops else 0.0
        rate = f"  {gflops:6.1f} GFLOP/s = {gflops / matmul:.0%} of matmul"
        log(
            f"  {label:<38} {seconds:.3f} s  {seconds / step:5.1%} of the step"
            + (rate if flops else "")
        )
    log(
        f"  model FLOPs: head {head / total_flops:.0%}, layers {trunk / total_flops:.0%} "
        f"(head = 6 x d_model x vocab per token)"
    )
    log(
        f"  default step: {tokens / step:.0f} tokens/s = "
        f"{total_flops / step / 1e9 / matmul:.0%} of matmul; with other settings:"
    )
    default = breakdown["settings"]
    for name, variant in breakdown["variant_settings"].items():
        changed = ", ".join(f"{k}={v}" for k, v in variant.items() if default[k] != v)
        seconds = parts.pop(name)
        log(
            f"    {changed:<40} {seconds:.3f} s  {tokens / seconds:5.0f} tokens/s = "
            f"{total_flops / seconds / 1e9 / matmul:.0%} of matmul ({step / seconds:.2f}x)"
        )
        parts[changed] = seconds
    log(
        f"  XLA counts {breakdown['unrolled_compiled_flops'] / total_flops:.2f}x the model FLOPs "
        "in the unrolled step (no recomputation)"
    )
    return {"step_s": step, **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile included)")
    parser.add_argument("--rounds", type=int, default=3, help="codemix/MaxText alternations")
    parser.add_argument("--python", help="Python >= 3.12 for MaxText's venv (default: search)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="MaxText's venv")
    parser.add_argument("--maxtext_version", default=MAXTEXT_VERSION)
    parser.add_argument(
        "--maxtext_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra MaxText config override, e.g. remat_policy=minimal (repeatable)",
    )
    parser.add_argument(
        "--same_jax",
        action="store_true",
        help="also time codemix in MaxText's venv (its JAX version), as a control",
    )
    parser.add_argument("--no_breakdown", action="store_true", help="skip the breakdown")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()

    log(f"host: {os.cpu_count()} CPUs, load average {load_average()} (1, 5, 15 min)")
    python, looked_at = find_python(args.python)
    maxtext_python: Path | None = None
    if python is None:
        missing = (
            f"--python {args.python} is not a Python >= 3.12"
            if args.python
            else f"none is on this machine (looked at: {', '.join(looked_at)})"
        )
        log(
            f"MaxText: NOT MEASURED. MaxText needs Python >= 3.12 and {missing}. Install one "
            "(e.g. `pyenv install 3.13`) or pass --python; measuring codemix alone."
        )
    else:
        log(f"MaxText: Python {'.'.join(map(str, python_version(python)))} at {python}")
        ensure_maxtext_venv(python, args.venv, args.maxtext_version)
        maxtext_python = venv_python(args.venv)
        if args.same_jax:
            ensure_gin(args.venv)

    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    maxtext_args = [*steps, *(a for kv in args.maxtext_set for a in ("--set", kv))]
    runs: dict[str, list[dict]] = {"codemix": [], "maxtext": [], "codemix_same_jax": []}
    matmuls: dict[str, list[float]] = {"codemix venv": [], "MaxText venv": []}
    rounds = []
    for index in range(args.rounds):
        load = load_average()
        matmul = run_worker(sys.executable, "matmul_rate.py")
        matmuls["codemix venv"].append(matmul["median_gflops"])
        line = (
            f"round {index + 1}/{args.rounds} (load {load}): matmul {matmul['median_gflops']:.0f}"
        )
        if maxtext_python:
            other = run_worker(maxtext_python, "matmul_rate.py")
            matmuls["MaxText venv"].append(other["median_gflops"])
            line += f" / {other['median_gflops']:.0f} (jax {matmul['jax']} / {other['jax']})"
        order = ["codemix", "maxtext"] if index % 2 == 0 else ["maxtext", "codemix"]
        if args.same_jax and maxtext_python:
            order.append("codemix_same_jax")
        timings = {}
        for system in order:
            if system == "codemix":
                result = run_worker(sys.executable, "codemix_worker.py", "step", *steps)
            elif system == "codemix_same_jax":
                result = run_worker(
                    maxtext_python, "codemix_worker.py", "step", *steps, pythonpath=str(REPO)
                )
            elif maxtext_python:
                result = run_worker(maxtext_python, "maxtext_worker.py", *maxtext_args)
            else:
                continue
            runs[system].append(result)
            timings[system] = statistics.median(result["step_times_s"])
        log(
            line
            + " GFLOP/s; median step "
            + ", ".join(f"{system} {seconds:.3f} s" for system, seconds in timings.items())
        )
        rounds.append({"load": load, "matmul": matmul, "median_step_s": timings})

    matmul_rate = statistics.median(matmuls["codemix venv"])
    flops_per_token = runs["codemix"][0]["flops_per_token"]
    log("")
    log(
        f"f32 matmul rate (2048^3, median over rounds): {matmul_rate:.1f} GFLOP/s in codemix's venv"
        + (
            f", {statistics.median(matmuls['MaxText venv']):.1f} GFLOP/s in MaxText's"
            if matmuls["MaxText venv"]
            else ""
        )
    )
    summary: dict[str, Any] = {"load_average_end": load_average(), "rounds": rounds}
    summary["matmul_gflops"] = {k: statistics.median(v) for k, v in matmuls.items() if v}
    log(f"Step time after {args.warmup} warm-up steps, {args.steps} steps x {args.rounds} rounds:")
    summary["codemix"] = summarize_system("codemix", runs["codemix"], flops_per_token, matmul_rate)
    if runs["maxtext"]:
        summary["maxtext"] = summarize_system(
            "MaxText", runs["maxtext"], flops_per_token, matmul_rate
        )
    if runs["codemix_same_jax"]:
        summary["codemix_same_jax"] = summarize_system(
            "codemix*", runs["codemix_same_jax"], flops_per_token, matmul_rate
        )
        same_jax = runs["codemix_same_jax"][0]["jax"]
        log(f"  (codemix*: codemix run in MaxText's venv, jax {same_jax})")
    share = summary["codemix"]["share_of_matmul"]
    if runs["maxtext"]:
        ratio = summary["codemix"]["tokens_per_s"] / summary["maxtext"]["tokens_per_s"]
        summary["ratio"] = ratio
        # Each round's own ratio: its two systems ran minutes apart, under much the same load.
        per_round = [
            statistics.median(m["step_times_s"]) / statistics.median(c["step_times_s"])
            for c, m in zip(runs["codemix"], runs["maxtext"], strict=True)
        ]
        summary["ratio_per_round"] = per_round
        fastest = summary["maxtext"]["fastest_step_s"] / summary["codemix"]["fastest_step_s"]
        log(
            f"ratio codemix / MaxText tokens/s: {ratio:.2f} (per round "
            f"{', '.join(f'{r:.2f}' for r in per_round)}; fastest steps {fastest:.2f})  "
            f"(target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})"
        )
        log("")
        report_fairness(runs["codemix"][0], runs["maxtext"][0])
    log(
        f"codemix at {share:.0%} of the matmul rate (target >= {TARGET_MATMUL_SHARE:.0%}: "
        f"{'met' if share >= TARGET_MATMUL_SHARE else 'NOT met'})"
    )

    if not args.no_breakdown:
        log("")
        breakdown = run_worker(sys.executable, "codemix_worker.py", "breakdown", *steps)
        head_flops = 6.0 * breakdown["head_params"]
        summary["breakdown"] = report_breakdown(breakdown, matmul_rate, head_flops)
        batches = run_worker(sys.executable, "codemix_worker.py", "input")
        if batches.get("skipped"):
            log(f"  input iterator: not measured ({batches['skipped']})")
        else:
            per_batch = batches["mean_batch_s"]
            share_of_step = per_batch / summary["breakdown"]["step_s"]
            log(
                f"  input iterator (demo corpus, seq 256, batch 8): {per_batch * 1e3:.2f} ms per "
                f"batch = {share_of_step:.2%} of the step"
            )
            summary["input_batch_s"] = per_batch
    log(f"load average at the end: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    log(f"({time.perf_counter() - started:.0f} s)")
