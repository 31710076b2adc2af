"""Subprocess helper for test_attention: the kernels under the model's sharding on 8 CPU devices.

Computes a tiny GQA model's logits and parameter gradients on one device with the XLA reference,
then with each kernel (interpreted) under a data=2 x fsdp=2 x tensor=2 mesh with params and batch
sharded by the project's rules, and prints the largest differences as ``RESULT {json}``. It needs
its own process because the 8 fake CPU devices must be configured before JAX starts.
"""

import dataclasses
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from test_attention import (  # noqa: E402
    init_params,
    logits_and_grads,
    packed_batch,
    tiny_config,
    tiny_params,
)

from codemix_jax import sharding  # noqa: E402
from codemix_jax.model.attention_kernels import interpret_kernels  # noqa: E402


def sharded_logits_and_grads(config, mesh):
    """``logits_and_grads`` with params placed by the logical rules, rows over data x fsdp."""
    rules = sharding.LOGICAL_AXIS_RULES
    boxed = jax.eval_shape(lambda: init_params(config))
    shardings = sharding.logical_to_shardings(boxed, mesh, rules, what="parameter")
    params = jax.device_put(tiny_params(dataclasses.replace(config, attention="xla")), shardings)
    batch = {
        name: jax.device_put(value, sharding.batch_sharding(mesh, value.ndim))
        for name, value in packed_batch().items()
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), interpret_kernels():
        return logits_and_grads(config, batch, params)


def main() -> None:
    reference = tiny_config()
    expected, expected_grads = logits_and_grads(reference, packed_batch())
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    errors = {}
    for implementation in ("splash", "gpu_flash"):
        config = dataclasses.replace(reference, attention=implementation)
        logits, grads = sharded_logits_and_grads(config, mesh)
        grad_errors = jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), grads, expected_grads
        )
        errors[implementation] = {
            "logits": float(np.abs(np.asarray(logits) - np.asarray(expected)).max()),
            "grads": max(jax.tree.leaves(grad_errors)),
        }
    print("RESULT " + json.dumps(errors))


if __name__ == "__main__":
    main()
