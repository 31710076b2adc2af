"""Training metrics: JSONL + TensorBoard writers, throughput/MFU, and a progress line with ETA."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Mapping

import gin
import jax
import tensorflow as tf

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

    Only process 0 writes, so multi-host runs produce one set of files.
    """

    def __init__(self, run_dir: str):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115
        self._tensorboard = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float | int | str]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        with self._tensorboard.as_default(step=step):
            for name, value in scalars.items():
                if isinstance(value, int | float):
                    tf.summary.scalar(name, value)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


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

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self._last_step
        seconds = max(now - self._last_time, 1e-9)
        self.reset(step)
        tokens_per_second = steps * self._tokens_per_step / seconds
        return {
            "tokens_per_second": tokens_per_second,
            "step_time_s": seconds / max(steps, 1),
            "mfu": tokens_per_second * self._flops_per_token / self._peak,
        }


def progress_line(step: int, total: int, scalars: Mapping[str, float], start_time: float) -> str:
    """One human-readable status line: step, loss, speed, and ETA from the average step time."""
    elapsed = time.perf_counter() - start_time
    eta = datetime.timedelta(seconds=round(elapsed / max(step, 1) * (total - step)))
    return (
        f"step {step}/{total} ({100 * step / total:.0f}%) loss {scalars['loss']:.4f} "
        f"lr {scalars['learning_rate']:.2e} {scalars['tokens_per_second']:,.0f} tok/s "
        f"mfu {100 * scalars['mfu']:.2f}% eta {eta}"
    )
