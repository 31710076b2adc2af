"""Ahead-of-time compilation of the train step for a TPU slice, on any host (`codemix aot`).

Renting a pod to learn that a config runs out of HBM is expensive. libtpu can describe a TPU
topology without the hardware (``jax.experimental.topologies``); the exact step that `codemix
train` would run (same gin, same state layout, same step function) is lowered onto those devices
and compiled by the real TPU compiler, whose memory analysis gives the per-chip need. The target
``local`` compiles for this host's own devices instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import os
import re
import tempfile
from collections.abc import Sequence

import gin
import jax
from flax import linen as nn

from codemix_jax import compiled_step, gin_config, sharding
from codemix_jax.model import training_flops_per_token
from codemix_jax.tpu_topology import GIB, TpuSlice, tpu_slice
from codemix_jax.train_state import build_train_program


@dataclasses.dataclass(frozen=True)
class LocalDevices:
    """This host's own devices (``--topology local``): a step compiled for them runs here."""

    def devices(self) -> list[jax.Device]:
        return jax.devices()

    @property
    def chips(self) -> int:
        return len(self.devices())

    @property
    def hbm_bytes(self) -> int:
        """The device's memory limit; CPU devices report none and share the host's memory."""
        stats = self.devices()[0].memory_stats() or {}
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return stats.get("bytes_limit", host // self.chips)


def compile_target(accelerator: str, *, num_slices: int = 1) -> TpuSlice | LocalDevices:
    """``local`` is this host's devices; any other name is a TPU slice (``tpu_slice``)."""
    if accelerator != "local":
        return tpu_slice(accelerator, num_slices=num_slices)
    if num_slices != 1:
        raise ValueError(f"num_slices is for TPU slices; 'local' got {num_slices}")
    return LocalDevices()


@dataclasses.dataclass(frozen=True)
class AotReport:
    """Per-chip memory of one compiled train step against the chip's HBM."""

    accelerator: str
    num_slices: int
    chips: int
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm_bytes: int
    compiled_flops: float | None  # per chip; a scanned layer body counts once
    model_flops: float  # per chip per step: 6N + attention, as in MFU
    vocab_size: int
    remat: bool
    out_of_memory: bool = False  # the TPU compiler refused the step
    largest_buffers: tuple[str, ...] = ()  # from the compiler's memory report, when it refused

    @property
    def total_bytes(self) -> int:
        """What the step holds at its peak: inputs + outputs (donated ones once) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and self.total_bytes <= self.hbm_bytes

    def as_json(self) -> dict:
        fields = dataclasses.asdict(self)
        return {**fields, "total_bytes": self.total_bytes, "fits": self.fits}


def aot_compile(
    *,
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    accelerator: str,
    num_slices: int = 1,
    save_compiled: str = "",
) -> AotReport:
    """Compile `codemix train`'s step for ``accelerator``; the report says whether it fits.

    A step that does not fit makes the TPU compiler fail; that becomes a report with
    ``fits = False``, the compiler's requirement and its list of the largest buffers. A step that
    compiles is written to ``save_compiled`` when given (``compiled_step.load`` reads it).
    """
    target = compile_target(accelerator, num_slices=num_slices)
    extra = [f"make_mesh.dcn_data = {num_slices}"] if num_slices > 1 else []
    gin_config.parse(gin_files, [*gin_bindings, *extra])
    # The gin file's mesh, laid out on the target's devices; everything else exactly as in train.
    gin.bind_parameter("train.mesh", sharding.make_mesh(devices=target.devices()))
    args = gin.get_bindings("train")
    dataset, mesh = args["dataset"], args["mesh"]
    wanted = inspect.signature(build_train_program).parameters
    with jax.set_mesh(mesh), nn.logical_axis_rules(args["rules"]):
        program = build_train_program(**{k: v for k, v in args.items() if k in wanted})
        lowered = program.lower()
    model_flops = (
        training_flops_per_token(args["model_config"], dataset.seq_len)
        * dataset.global_batch_size
        * dataset.seq_len
        / target.chips
    )
    base = {
        "accelerator": accelerator,
        "num_slices": num_slices,
        "chips": target.chips,
        "mesh": dict(mesh.shape),
        "hbm_bytes": target.hbm_bytes,
        "model_flops": model_flops,
        "vocab_size": args["model_config"].vocab_size,
        "remat": args["model_config"].remat,
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return _out_of_memory_report(lowered, str(error), base)
    if save_compiled:
        signature = compiled_step.signature(program, lowered)
        compiled_step.save(compiled, signature=signature, path=save_compiled)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    return AotReport(
        **base,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        compiled_flops=(cost or {}).get("flops"),
    )


def _out_of_memory_report(lowered: jax.stages.Lowered, message: str, base: dict) -> AotReport:
    """The compiler's need and budget from its message ('... HLO temporaries (17.70G) exceeds
    available HBM (15.75G)'), and its largest allocations from a memory-usage dump."""
    found = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message)
    with tempfile.TemporaryDirectory() as dump_dir:
        # Compiling again with a dump fails the same way, after writing the report.
        with contextlib.suppress(jax.errors.JaxRuntimeError):
            lowered.compile(compiler_options={"xla_dump_to": dump_dir})
        reports = glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt"))
        buffers = _largest_allocations(reports[0]) if reports else ()
    if found:
        base = {**base, "hbm_bytes": _bytes(found.group(3), found.group(4))}
    return AotReport(
        **base,
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=_bytes(found.group(1), found.group(2)) if found else 0,
        compiled_flops=None,
        out_of_memory=True,
        largest_buffers=buffers,
    )


def _largest_allocations(path: str, count: int = 5) -> tuple[str, ...]:
    """'15.62GiB: bf16[2,16,8192,8192], ...' for the ``count`` largest allocations."""
    with open(path) as f:
        rows = [line.split(";") for line in f if line.count(";") >= 4]
    return tuple(
        f"{size.strip()}: {shapes.strip()}" for _, size, _, _, shapes in rows[1 : count + 1]
    )


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "BKMGT".index(unit))


def advice(report: AotReport) -> list[str]:
    """Which knob would help, read from the largest buffers' shapes."""
    if report.fits:
        return []
    shapes = " ".join(report.largest_buffers).replace(" ", "")
    tips = []
    if re.search(r"\[\d+,\d+,(\d+),\1\]", shapes):
        tips.append("dense [b, heads, l, l] attention scores: ModelConfig.attention = 'splash'")
    if re.search(rf",{report.vocab_size}\]", shapes):
        tips.append("full [b, l, vocab] logits: token_losses.chunk_size = 512 (chunked loss)")
    if not report.remat:
        tips.append("ModelConfig.remat = True (recompute activations in the backward pass)")
    tips += [
        "fewer rows per pass: train.microbatches = 2, 4, ... (the same update)",
        "more of the mesh on fsdp (params and optimizer state sharded over more chips)",
    ]
    return tips


def format_report(report: AotReport) -> str:
    """The table `codemix aot` prints."""
    share = f"{100 * report.total_bytes / report.hbm_bytes:.0f} %"
    lines = [
        f"{report.accelerator} x{report.num_slices} ({report.chips} chips), mesh {report.mesh}"
    ]
    if report.out_of_memory:
        lines.append(
            f"  the compiler needs {_gib(report.total_bytes)} per chip of {_gib(report.hbm_bytes)}"
            f" HBM ({share}): DOES NOT FIT"
        )
    else:
        lines += [
            f"  arguments   {_gib(report.argument_bytes)} per chip",
            f"  outputs     {_gib(report.output_bytes)} (donated: {_gib(report.alias_bytes)})",
            f"  temporaries {_gib(report.temp_bytes)}",
            f"  total       {_gib(report.total_bytes)} of {_gib(report.hbm_bytes)} HBM ({share}): "
            + ("fits" if report.fits else "DOES NOT FIT"),
            f"  compiled    {report.compiled_flops or 0:.3e} FLOPs (a scanned layer counted once)",
        ]
    lines.append(f"  model FLOPs {report.model_flops:.3e} per chip per step")
    lines += [f"  largest: {buffer}" for buffer in report.largest_buffers]
    lines += [f"  try: {tip}" for tip in advice(report)]
    return "\n".join(lines)


def _gib(size: float) -> str:
    return f"{size / GIB:8.2f} GiB" if size >= GIB / 10 else f"{size / 2**20:8.2f} MiB"
