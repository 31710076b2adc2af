"""Training metrics: JSONL + TensorBoard writers, throughput/MFU, and a progress line with ETA."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import gin
import jax
import jax.numpy as jnp
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, by jax ``device_kind`` prefix (vendor data sheets).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
# CPU has no data-sheet number we can trust: we use the f32 matmul rate measured on this project's
# 2-core development host (about 150 GFLOP/s for the whole process), shared by its local devices.
CPU_PEAK_FLOPS_PER_PROCESS = 150e9


@gin.configurable
def peak_flops_per_device(*, override: float | None = None) -> float:
    """Peak FLOP/s of one local device, used as the MFU denominator."""
    if override:
        return override
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return CPU_PEAK_FLOPS_PER_PROCESS / jax.local_device_count()
    for prefix, flops in PEAK_FLOPS_BY_DEVICE_KIND.items():
        if device.device_kind.startswith(prefix):
            return flops
    raise ValueError(
        f"unknown peak FLOP/s for device kind {device.device_kind!r}: "
        "bind peak_flops_per_device.override in gin"
    )


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl and the same scalars to TensorBoard.

    Only process 0 writes, so multi-host runs produce one set of files. A run resumed from step
    ``resume_step`` continues both from there, so that a reader sees each step once although the
    run that crashed logged past its last checkpoint: metrics.jsonl loses its records after that
    step, and the new events file opens with a ``SessionLog.START`` at ``resume_step + 1``, on
    which TensorBoard's readers discard every event read so far at or after that step.
    """

    def __init__(self, run_dir: str, *, resume_step: int):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        keep_records_up_to(path, resume_step)
        self._jsonl = open(path, "a")  # noqa: SIM115
        # TensorBoard's own writer, not tf.summary's: it writes the SessionLog event too.
        self._tensorboard = EventFileWriter(os.path.join(run_dir, "tensorboard"))
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._tensorboard.add_event(_event(resume_step + 1, session_log=start))

    def write(self, step: int, scalars: Mapping[str, float | int | str]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        values = [
            summary_pb2.Summary.Value(tag=name, simple_value=value)
            for name, value in scalars.items()
            if isinstance(value, int | float)
        ]
        self._tensorboard.add_event(_event(step, summary=summary_pb2.Summary(value=values)))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _event(step: int, **fields) -> event_pb2.Event:
    return event_pb2.Event(wall_time=time.time(), step=step, **fields)


def keep_records_up_to(path: str, step: int) -> None:
    """Rewrite the metrics.jsonl at ``path`` (if any) without its records after ``step``.

    A line that is not JSON is the torn last line of a crashed run and goes too. The file is
    replaced atomically: a crash while rewriting it leaves the old one.
    """
    if not os.path.exists(path):
        return
    with open(path) as old:
        kept = [line.rstrip("\n") + "\n" for line in old if _step_of(line) <= step]
    partial = f"{path}.partial"
    with open(partial, "w") as new:
        new.writelines(kept)
        new.flush()
        os.fsync(new.fileno())
    os.replace(partial, path)


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a torn one, which is past every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class Throughput:
    """Tokens/s and MFU over the interval since the previous call."""

    def __init__(self, *, tokens_per_step: int, flops_per_token: float, num_devices: int):
        self._tokens_per_step = tokens_per_step
        self._flops_per_token = flops_per_token
        self._peak = peak_flops_per_device() * num_devices
        self._last_time = time.perf_counter()
        self._last_step = 0

    def reset(self, step: int) -> None:
        """Start a new interval (e.g. after the first, compiling, step)."""
        self._last_time = time.perf_counter()
        self._last_step = step

    def leave_out(self, seconds: float) -> None:
        """Keep ``seconds`` spent on something other than training steps out of the interval."""
        self._last_time += seconds

    def measure(self, step: int) -> dict[str, float]:
        """The interval's figures; none when it holds no step (it starts after the compiling one),
        since any figure for it would be zero or absurd."""
        now = time.perf_counter()
        steps = step - self._last_step
        if not steps:
            return {}
        seconds = max(now - self._last_time, 1e-9)
        self.reset(step)
        tokens_per_second = steps * self._tokens_per_step / seconds
        return {
            "tokens_per_second": tokens_per_second,
            "step_time_s": seconds / steps,
            "mfu": tokens_per_second * self._flops_per_token / self._peak,
        }


def summarize(totals: Mapping[str, jax.Array], source_names: Sequence[str]) -> dict[str, float]:
    """Turn metric sums accumulated over an interval into means (and realized token shares).

    Losses are means over the tokens the loss weighs (an instruction source's response tokens and
    EOS); token shares count all tokens, as the mixture's shares do.
    """
    totals = jax.device_get(totals)
    scalars = {
        "loss": float(totals["loss_sum"] / max(totals["loss_tokens"], 1.0)),
        "grad_norm": float(totals["grad_norm"] / max(totals["steps"], 1.0)),
    }
    source_total = max(float(totals["source_tokens"].sum()), 1.0)
    for i, name in enumerate(source_names):
        loss_tokens = float(totals["source_loss_tokens"][i])
        if loss_tokens:
            scalars[f"loss/{name}"] = float(totals["source_loss_sum"][i] / loss_tokens)
        scalars[f"token_share/{name}"] = float(totals["source_tokens"][i]) / source_total
    return scalars


class Evaluation(Protocol):
    """Scalars measured on the params now and then (a validation), written in that step's record."""

    def due(self, step: int) -> bool: ...

    def run(self, step: int, params: Any) -> Mapping[str, float]: ...


class IntervalLogger:
    """Sums step metrics on device and, every ``log_every`` steps, writes their means.

    Step 1 and the last step are always written too: a stage's first and last LR are in its
    metrics (the next stage may start from the last one). Summing on device keeps the host from
    waiting on every step; only logged steps sync. A step at which ``evaluation`` is due is
    written too, with its scalars; the time it takes is not in the throughput figures.
    """

    def __init__(
        self,
        *,
        writer: MetricsWriter,
        throughput: Throughput,
        source_names: Sequence[str],
        learning_rate: Callable[[int], float],
        phase_at: Callable[[int], int],
        first_step: int,
        num_steps: int,
        log_every: int,
        evaluation: Evaluation | None = None,
    ):
        self._writer, self._throughput, self._evaluation = writer, throughput, evaluation
        self._source_names, self._learning_rate, self._phase_at = (
            source_names,
            learning_rate,
            phase_at,
        )
        self._first_step, self._num_steps, self._log_every = first_step, num_steps, log_every
        self._totals = None
        self._start_time = time.perf_counter()

    def add(
        self, step: int, metrics: Mapping[str, jax.Array], params: Any = None
    ) -> dict[str, float] | None:
        """Accumulate ``step``'s metrics (and evaluate ``params`` if due); returns the logged
        scalars on a log step."""
        if self._totals is None:
            self._totals = metrics
        else:
            self._totals = jax.tree.map(jnp.add, self._totals, metrics)
        if step == self._first_step:  # Keep compilation out of the throughput figures.
            jax.block_until_ready(self._totals)
            self._throughput.reset(step)
        evaluated = self._evaluate(step, params)
        if not evaluated and step % self._log_every and step not in (1, self._num_steps):
            return None
        scalars = summarize(self._totals, self._source_names)
        scalars["learning_rate"] = float(self._learning_rate(step - 1))
        scalars["mixture_phase"] = self._phase_at(step - 1)
        scalars.update(self._throughput.measure(step))
        scalars.update(evaluated)
        self._writer.write(step, scalars)
        done = (step - self._first_step + 1) / (self._num_steps - self._first_step + 1)
        log.info(progress_line(step, self._num_steps, done, scalars, self._start_time))
        self._totals = None
        return scalars

    def _evaluate(self, step: int, params: Any) -> Mapping[str, float]:
        if self._evaluation is None or not self._evaluation.due(step):
            return {}
        jax.block_until_ready(params)  # the steps before it are training time
        start = time.perf_counter()
        evaluated = self._evaluation.run(step, params)
        self._throughput.leave_out(time.perf_counter() - start)
        return evaluated


def progress_line(
    step: int, total: int, done: float, scalars: Mapping[str, float], start_time: float
) -> str:
    """One human-readable status line: step, loss, speed (if measured), and ETA from ``done``."""
    elapsed = time.perf_counter() - start_time
    eta = datetime.timedelta(seconds=round(elapsed / done * (1 - done)))
    speed = (
        f"{scalars['tokens_per_second']:,.0f} tok/s mfu {100 * scalars['mfu']:.2f}% "
        if "mfu" in scalars
        else ""
    )
    return (
        f"step {step}/{total} ({100 * step / total:.0f}%) loss {scalars['loss']:.4f} "
        f"lr {scalars['learning_rate']:.2e} {speed}eta {eta}"
    )
