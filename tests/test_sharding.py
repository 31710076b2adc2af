"""Mesh construction, divisibility errors, and loss equality across mesh shapes."""

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


def test_same_metrics_on_one_device_and_four_8_device_meshes():
    meshes = [
        {"data": 8, "fsdp": 1},
        {"data": 1, "fsdp": 8},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 1, "fsdp": 2, "tensor": 4},
    ]
    # Bad layouts must fail before compiling, naming the value.
    bad = [{"data": 3, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 8}]
    reference, *results, bad_mesh, bad_heads = run_meshes([{"num_devices": 1}, *meshes, *bad])
    assert reference["loss"][2] < reference["loss"][0]  # the optimizer steps change the model
    for mesh, result in zip(meshes, results, strict=True):
        # Every mesh sees every real token of every source: counts are exact.
        assert result["source_tokens"] == reference["source_tokens"], mesh
        for key in ("loss", "grad_norm", "source_loss_sum"):
            np.testing.assert_allclose(
                result[key], reference[key], rtol=MESH_RTOL, err_msg=f"{key} on {mesh}"
            )
    assert "'data': 3" in bad_mesh["error"] and "8 are available" in bad_mesh["error"]
    assert "does not divide mesh axes" in bad_heads["error"]
    assert "size 4" in bad_heads["error"] and "tensor" in bad_heads["error"]
