"""A parsed gin config laid on a TPU slice: its mesh, batch shards, rows per chip and processes.

Checked from the gin config and the slice's name alone (no devices, no compile), so `codemix plan`
and `codemix launch` refuse an impossible job, naming the bad value, before any cloud command.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from codemix_jax import gin_config, sharding
from codemix_jax.tpu_topology import TpuSlice, tpu_slice

if TYPE_CHECKING:
    from codemix_jax.stage_plan import StagePlan


_WHAT = "the job"  # names it in a missing binding's error


@dataclasses.dataclass(frozen=True)
class JobShape:
    tpu: TpuSlice
    mesh: dict[str, int]  # within one slice; ``num_slices`` copies of it are joined over DCN
    global_batch_size: int
    seq_len: int
    microbatches: int

    @property
    def batch_shards(self) -> int:
        """How many ways the batch rows are split: data x fsdp within a slice, times slices."""
        return self.mesh["data"] * self.mesh["fsdp"] * self.tpu.num_slices

    @property
    def rows_per_shard(self) -> int:
        return self.global_batch_size // self.batch_shards

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def job_shape(*, accelerator: str, num_slices: int = 1) -> JobShape:
    """The parsed config's job on ``accelerator`` x ``num_slices``; ValueError names what fails."""
    tpu = tpu_slice(accelerator, num_slices=num_slices)
    where = f"{accelerator}" + (f" x {num_slices} slices" if num_slices > 1 else "")
    try:
        mesh = sharding.resolve_axis_sizes(_mesh_axes(), tpu.chips_per_slice)
    except sharding.ShardingError as error:
        raise sharding.ShardingError(
            f"the gin mesh does not factor into {where} ({tpu.chips_per_slice} chips per slice): "
            f"{error}"
        ) from error
    shape = JobShape(
        tpu=tpu,
        mesh=mesh,
        global_batch_size=gin_config.bound("MixtureInput.global_batch_size", what=_WHAT),
        seq_len=gin_config.bound("MixtureInput.seq_len", what=_WHAT),
        microbatches=gin_config.bound("train.microbatches", what=_WHAT, default=1),
    )
    _check_batch(shape, where)
    return shape


def stage_shapes(
    stages: Sequence[StagePlan], *, accelerator: str, num_slices: int = 1
) -> Iterator[tuple[StagePlan, JobShape]]:
    """Each stage of an experiment's plan laid on the slice, its gin config parsed while it is
    yielded; the first that cannot run there is refused, naming the stage."""
    for stage in stages:
        gin_config.parse(stage.gin_files, stage.bindings)
        try:
            shape = job_shape(accelerator=accelerator, num_slices=num_slices)
        except ValueError as error:
            raise ValueError(f"stage {stage.name!r}: {error}") from error
        yield stage, shape


def _check_batch(shape: JobShape, where: str) -> None:
    batch, shards = shape.global_batch_size, shape.batch_shards
    split = (
        f"global batch {batch} over {shards} batch shards (data {shape.mesh['data']} x fsdp "
        f"{shape.mesh['fsdp']} x {shape.tpu.num_slices} slice(s)) on {where}"
    )
    if batch < shards:
        raise ValueError(
            f"a per-chip batch of zero: {split}; raise MixtureInput.global_batch_size to at least "
            f"{shards} or put more of the mesh on tensor"
        )
    if batch % shards:
        raise ValueError(f"{split}: the batch does not divide evenly")
    if batch % shape.tpu.processes:
        raise ValueError(f"global batch {batch} does not divide over {shape.tpu.processes} hosts")
    if shape.rows_per_shard % shape.microbatches:
        raise ValueError(
            f"train.microbatches = {shape.microbatches} does not divide the {shape.rows_per_shard} "
            f"rows per batch shard ({split})"
        )


def _mesh_axes() -> dict[str, int]:
    """make_mesh's data/fsdp/tensor as the gin config binds them (its defaults otherwise)."""
    defaults = inspect.signature(sharding.make_mesh).parameters
    return {
        axis: gin_config.bound(f"make_mesh.{axis}", what=_WHAT, default=defaults[axis].default)
        for axis in sharding.MESH_AXES
    }
