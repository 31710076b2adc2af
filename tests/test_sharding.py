"""Mesh construction, divisibility errors, and loss equality across mesh shapes."""

import json
import os
import subprocess
import sys

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


def test_same_loss_on_one_device_and_three_8_device_meshes():
    meshes = [
        {"num_devices": 1},
        {"data": 8, "fsdp": 1},
        {"data": 1, "fsdp": 8},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 1, "fsdp": 2, "tensor": 4},
        # Bad layouts must fail before compiling, naming the value.
        {"data": 3, "fsdp": 1, "tensor": 1},
        {"data": 1, "fsdp": 1, "tensor": 8},
    ]
    *good, bad_mesh, bad_heads = run_meshes(meshes)
    reference = good[0]["losses"]
    assert reference[2] < reference[0]  # the optimizer steps actually change the model
    for result in good[1:]:
        assert result["losses"] == pytest.approx(reference, rel=2e-4)
    assert "'data': 3" in bad_mesh["error"] and "8 are available" in bad_mesh["error"]
    assert "does not divide mesh axes" in bad_heads["error"]
    assert "size 4" in bad_heads["error"] and "tensor" in bad_heads["error"]
