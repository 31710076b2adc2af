"""This host's float32 matmul rate (2048 x 2048 x 2048, jitted); one JSON line on stdout.

The yardstick of ``bench/maxtext_compare.py``: a CPU has no data-sheet peak, so a step's model
FLOP rate is set against what one large f32 matmul reaches on the same cores at the same moment.
It needs only JAX and numpy, so the comparison runs it in codemix's venv and in MaxText's (two JAX
versions) to show whether the two XLA builds multiply equally fast.

    python bench/matmul_rate.py [--size 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp


def matmul_gflops(size: int, repeats: int) -> list[float]:
    """GFLOP/s of ``repeats`` timed ``[size, size] @ [size, size]`` products, after one warm-up."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rates = matmul_gflops(args.size, args.repeats)
    print(
        json.dumps(
            {
                "jax": jax.__version__,
                "size": args.size,
                "gflops": rates,
                "median_gflops": statistics.median(rates),
            }
        )
    )


if __name__ == "__main__":
    main()
