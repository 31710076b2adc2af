"""Mesh construction, divisibility errors, and loss equality across mesh shapes, with and without
microbatches and the chunked loss."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from codemix_jax import sharding

SCRIPT = os.path.join(os.path.dirname(__file__), "mesh_losses.py")


def run_meshes(meshes: list[dict]) -> list[dict]:
    result = subprocess.run(
        [sys.executable, SCRIPT, json.dumps(meshes)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_minus_one_fills_the_remaining_devices():
    assert sharding.resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3, "fsdp": -1, "tensor": 1}, "product 3"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "has 4 devices but 8"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "only one mesh axis"),
        ({"data": 0, "fsdp": -1, "tensor": 1}, "data=0"),
    ],
)
def test_bad_mesh_is_named(sizes, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.resolve_axis_sizes(sizes, 8)


# Measured spread across these meshes (relative to the 1-device run, any step, CPU, jax as pinned
# in constraints.txt): loss 2.6e-7, grad norm 8e-8, per-source loss sums 1e-7 (one f32 ulp).
# Differences come only from reduction order, so the tolerance is a few times that: a dropped or
# repeated row, or a loss off by 1e-5 relative, is far outside it.
MESH_RTOL = 1e-6


MESHES = [
    {"data": 8, "fsdp": 1},
    {"data": 1, "fsdp": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 2, "tensor": 4},
]
# Bad layouts must fail before compiling, naming the value.
BAD_MESHES = [{"data": 3, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 8}]
# test_microbatches' meshes: microbatches and the chunked loss under data/fsdp/tensor, and a
# per-device split that must be refused by name.
MICROBATCH_MESHES = [
    {"data": 2, "fsdp": 2, "tensor": 2, "microbatches": 2},
    {"data": 1, "fsdp": 2, "tensor": 4, "microbatches": 4, "chunk_size": 8},
]
BAD_MICROBATCHES = {"data": 1, "fsdp": 8, "tensor": 1, "microbatches": 2}


@pytest.fixture(scope="module")
def mesh_runs() -> dict:
    """One subprocess (JAX's start-up and the 1-device reference paid once) for both tests."""
    reference, *results = run_meshes(
        [{"num_devices": 1}, *MESHES, *BAD_MESHES, *MICROBATCH_MESHES, BAD_MICROBATCHES]
    )
    meshes, results = results[: len(MESHES)], results[len(MESHES) :]
    bad, results = results[: len(BAD_MESHES)], results[len(BAD_MESHES) :]
    microbatches, [refused] = results[: len(MICROBATCH_MESHES)], results[len(MICROBATCH_MESHES) :]
    return {
        "reference": reference,
        "meshes": meshes,
        "bad": bad,
        "microbatches": microbatches,
        "refused": refused,
    }


def test_same_metrics_on_one_device_and_four_8_device_meshes(mesh_runs):
    reference, bad_mesh, bad_heads = mesh_runs["reference"], *mesh_runs["bad"]
    assert reference["loss"][2] < reference["loss"][0]  # the optimizer steps change the model
    for mesh, result in zip(MESHES, mesh_runs["meshes"], strict=True):
        # Every mesh sees every real token of every source: counts are exact.
        assert result["source_tokens"] == reference["source_tokens"], mesh
        for key in ("loss", "grad_norm", "source_loss_sum"):
            np.testing.assert_allclose(
                result[key], reference[key], rtol=MESH_RTOL, err_msg=f"{key} on {mesh}"
            )
    assert "'data': 3" in bad_mesh["error"] and "8 are available" in bad_mesh["error"]
    assert "does not divide mesh axes" in bad_heads["error"]
    assert "size 4" in bad_heads["error"] and "tensor" in bad_heads["error"]


def test_microbatches_and_chunked_loss_on_8_device_meshes(mesh_runs):
    """(From test_microbatches, to share this file's subprocess.) 3 steps under data/fsdp/tensor
    meshes equal the 1-device whole-batch reference; splitting into microbatches moves no rows
    between devices; a per-device split is refused by name. Microbatching and chunking only
    reorder float32 sums further than the meshes do: the same MESH_RTOL."""
    reference = mesh_runs["reference"]
    for mesh, got in zip(MICROBATCH_MESHES, mesh_runs["microbatches"], strict=True):
        assert got["source_tokens"] == reference["source_tokens"], mesh
        for key in ("loss", "grad_norm", "source_loss_sum"):
            np.testing.assert_allclose(
                got[key], reference[key], rtol=MESH_RTOL, err_msg=f"{key} on {mesh}"
            )
        assert got["split_collectives"] == [], mesh
    assert (
        "train.microbatches=2 does not divide the per-device batch 1"
        in (mesh_runs["refused"]["error"])
    )
