"""Subprocess helper for test_eval_on_mesh: greedy samples and log-likelihoods on one
device and on an 8-device data=2 x fsdp=2 x tensor=2 mesh.

Prints ``RESULT {"one": {...}, "eight": {...}}``; its own process because the 8 fake CPU devices
must be configured before JAX starts.
"""

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

from test_sampling import PROMPTS, model_and_params  # noqa: E402

from codemix_jax import sharding  # noqa: E402
from codemix_jax.eval.loglikelihood import LoglikelihoodScorer  # noqa: E402
from codemix_jax.eval.sampling import Sampler, SamplingSettings  # noqa: E402
from codemix_jax.model import init_params  # noqa: E402

REQUESTS = [(prompt, [7, 8, 9][: 1 + i % 3]) for i, prompt in enumerate(PROMPTS * 3)]


def on_mesh(mesh: jax.sharding.Mesh) -> dict:
    model, params = model_and_params(num_kv_heads=2)
    rules = sharding.LOGICAL_AXIS_RULES
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(1)))
    params = jax.device_put(
        params, sharding.logical_to_shardings(boxed, mesh, rules, what="parameter")
    )
    sampler = Sampler(model=model, params=params, mesh=mesh, rules=rules, vocab_size=512)
    scorer = LoglikelihoodScorer(model=model, params=params, mesh=mesh, rules=rules, rows=8)
    return {
        "greedy": sampler.generate(PROMPTS, SamplingSettings(max_new_tokens=24)),
        "loglikelihoods": scorer.loglikelihoods(REQUESTS),
    }


if __name__ == "__main__":
    one = on_mesh(sharding.make_mesh(devices=jax.devices()[:1]))
    eight = on_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2))
    print("RESULT " + json.dumps({"one": one, "eight": eight}))
