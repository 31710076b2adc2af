"""The padded shape of an evaluation batch. Rows are a multiple of the mesh's batch shards (they
shard over data x fsdp) and lengths a multiple of ``LENGTH_BUCKET``: few shapes, few compilations.
"""

from __future__ import annotations

from jax.sharding import Mesh

from codemix_jax import sharding

LENGTH_BUCKET = 32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_rows(rows: int, mesh: Mesh) -> int:
    """``rows`` rounded up to a multiple of the mesh's batch shards."""
    return _round_up(rows, sharding.batch_shards(mesh))


def padded_length(longest: int, limit: int) -> int:
    """The bucketed length for rows of at most ``longest`` tokens, capped at ``limit``."""
    return min(_round_up(longest, LENGTH_BUCKET), limit)
