"""Safetensors shards of bounded size, named and indexed as transformers loads them.

Tensors are held until a shard is full, then written: host memory holds at most one shard (a
tensor larger than the bound gets a shard of its own). One shard is ``model.safetensors``; more
are ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` mapping each
tensor to its file.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ShardedWriter:
    """Writes tensors added one by one into ``directory`` in shards of at most ``max_bytes``."""

    def __init__(self, directory: str, *, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
        self._directory = directory
        self._max_bytes = max_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # the tensor names of each shard written
        self._names: set[str] = set()
        self._total_bytes = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} exported twice")
        self._names.add(name)
        if self._pending and self._pending_bytes + tensor.nbytes > self._max_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(tensor)
        self._pending_bytes += tensor.nbytes
        self._total_bytes += tensor.nbytes

    def close(self) -> list[str]:
        """Writes the last shard, names the shards by their count and indexes them; returns the
        file names."""
        self._flush()
        count = len(self._shards)
        if count == 1:
            os.rename(self._path(0), os.path.join(self._directory, SINGLE_FILE))
            return [SINGLE_FILE]
        names = [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        for k, name in enumerate(names):
            os.rename(self._path(k), os.path.join(self._directory, name))
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": {t: names[k] for k, shard in enumerate(self._shards) for t in shard},
        }
        with open(os.path.join(self._directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return [*names, INDEX_FILE]

    def _flush(self) -> None:
        if not self._pending:
            return
        # "pt": transformers refuses safetensors files whose metadata names no known framework.
        save_file(self._pending, self._path(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _path(self, k: int) -> str:
        """Where shard ``k`` is written before the count is known."""
        return os.path.join(self._directory, f"shard-{k:05d}.partial")
