"""Sampling and log-likelihood scoring on an 8-device mesh (data=2 x fsdp=2 x tensor=2, params
and rows sharded by the project's rules) against one device, from one subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_sampling import PROMPTS

MESH_SCRIPT = os.path.join(os.path.dirname(__file__), "eval_mesh.py")


@pytest.fixture(scope="module")
def on_two_meshes() -> dict:
    """Greedy samples and log-likelihoods of a GQA model on one device and on data=2 x fsdp=2 x
    tensor=2 (params and rows sharded by the project's rules), from one subprocess: the 8
    devices are set when JAX starts."""
    result = subprocess.run(
        [sys.executable, MESH_SCRIPT], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_sampling_on_an_8_device_mesh_equals_one_device(on_two_meshes):
    one_device = on_two_meshes["one"]["greedy"]
    assert len(one_device) == len(PROMPTS) and all(len(row) == 24 for row in one_device)
    assert on_two_meshes["eight"]["greedy"] == one_device


def test_log_likelihoods_on_an_8_device_mesh_equal_one_device(on_two_meshes):
    one = on_two_meshes["one"]["loglikelihoods"]
    assert len(one) == 3 * len(PROMPTS)
    np.testing.assert_allclose(on_two_meshes["eight"]["loglikelihoods"], one, atol=1e-4)
