"""Subprocess helper for test_validation: the validation figures on 8-device meshes.

Run as ``python tests/validation_mesh.py CORPUS_DIR VOCAB_PATH INSTRUCTIONS_DIR``; prints
``RESULT [[scalars per mesh], refusal message]``. Its own process because the 8 fake CPU devices
must be configured before JAX starts.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

from test_validation import BATCH, ROWS, measure, run_sources  # noqa: E402

from codemix_jax import sharding  # noqa: E402

MESHES = [{"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]


if __name__ == "__main__":
    corpus_dir, vocab_path, instructions_dir = sys.argv[1:]
    sources = run_sources(corpus_dir, instructions_dir)
    scalars = [
        measure(sources, vocab_path, sharding.make_mesh(**mesh), rows=ROWS, batch_size=BATCH)[2]
        for mesh in MESHES
    ]
    try:
        measure(sources, vocab_path, sharding.make_mesh(**MESHES[0]), rows=ROWS, batch_size=4)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    print("RESULT " + json.dumps([scalars, refusal]))
