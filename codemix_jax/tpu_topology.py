"""TPU slices by name (``v5e-256``, ``v5p-512`` x 2 slices): chip grid, hosts, HBM and peak FLOPs.

One table serves every consumer: `codemix aot` (libtpu's compile-only topology), `codemix plan`
(chip-hours) and `codemix launch` (how many workers a slice has). Figures are per chip, from the
data sheets; sizes in a name count TensorCores on v4/v5p and chips on v5e/v6e, as gcloud does.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

GIB = 2**30

# TPU runs train with the memory-saving kernels (splash attention, the chunked loss): paper A's arm
# files do not include them, and its 470M step does not fit a v5e chip without them. `codemix
# plan` and `codemix launch` append this file unless told not to.
TPU_PLATFORM_GIN = "gin/platforms/tpu.gin"


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What a name like ``v5e-256`` needs to become a libtpu topology, and the chip's budget."""

    topology_prefix: str  # libtpu's name: "v5e" in "v5e:16x16"
    chip_config: str  # "megacore" fuses a v4 chip's two TensorCores into one JAX device
    cores_per_chip_in_name: int  # v4-N and v5p-N count TensorCores, v5e-N and v6e-N chips
    shapes: dict[int, tuple[int, ...]]  # chips in the slice -> physical chip grid
    hbm_bytes: int  # per chip, as the TPU compiler budgets it
    peak_flops: float  # dense bf16 per chip (data sheet)
    full_torus: int  # axes of this many chips or more wrap around
    chips_per_host: int  # of a multi-host slice; a slice of up to single_host_chips has one host
    single_host_chips: int


_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}  # fmt: skip
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
            128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
            2048: (8, 16, 16), 4096: (16, 16, 16)}  # fmt: skip

# One table: every accelerator name `codemix aot` and the planner accept maps through it.
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", "megacore", 2, _GRID_3D, 32 * GIB, 275e12, 4, 4, 4),
    "v5e": TpuGeneration("v5e", "default", 1, _GRID_2D, int(15.75 * GIB), 197e12, 16, 4, 8),
    "v5p": TpuGeneration("v5p", "default", 2, _GRID_3D, 95 * GIB, 459e12, 4, 4, 4),
    "v6e": TpuGeneration("v6e", "default", 1, _GRID_2D, int(31.25 * GIB), 918e12, 16, 4, 8),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    accelerator: str
    generation: TpuGeneration
    chip_grid: tuple[int, ...]
    num_slices: int

    @property
    def chips(self) -> int:
        """Chips in all slices together."""
        return math.prod(self.chip_grid) * self.num_slices

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.chip_grid)

    @property
    def hosts_per_slice(self) -> int:
        """TPU VM workers per slice: each runs one JAX process."""
        if self.chips_per_slice <= self.generation.single_host_chips:
            return 1
        return self.chips_per_slice // self.generation.chips_per_host

    @property
    def processes(self) -> int:
        return self.hosts_per_slice * self.num_slices

    def devices(self) -> list[jax.Device]:
        """Compile-only devices of this slice (or slices); they can compile but not run."""
        grid = self.chip_grid
        # Compiling touches no chip, so libtpu's one-process-per-host lock is not needed.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{self.generation.topology_prefix}:{'x'.join(map(str, grid))}",
            chip_config_name=self.generation.chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=self.num_slices,
            wrap=tuple(size >= self.generation.full_torus for size in (*grid, 1)[:3]),
        )
        return list(description.devices)

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes


def tpu_slice(accelerator: str, *, num_slices: int = 1) -> TpuSlice:
    """``v5e-256`` (and ``num_slices`` of it) -> its chip grid; a clear error for unknown names."""
    match = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", accelerator)
    generation = TPU_GENERATIONS.get(match.group(1)) if match else None
    if generation is None:
        raise ValueError(
            f"unknown TPU accelerator {accelerator!r}: expected <generation>-<size> with "
            f"generation one of {sorted(TPU_GENERATIONS)}, e.g. v5e-256"
        )
    chips, remainder = divmod(int(match.group(2)), generation.cores_per_chip_in_name)
    if remainder or chips not in generation.shapes:
        sizes = sorted(c * generation.cores_per_chip_in_name for c in generation.shapes)
        raise ValueError(f"no {match.group(1)} slice of size {match.group(2)}; known: {sizes}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    return TpuSlice(accelerator, generation, generation.shapes[chips], num_slices)
