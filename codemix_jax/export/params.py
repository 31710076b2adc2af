"""A saved step's params read a few arrays at a time into host memory.

The export never holds the whole model: each read restores only the named arrays (orbax partial
restore, every shard of each, whatever mesh or number of processes wrote them) as numpy, and the
caller drops them once converted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from codemix_jax.checkpoint import SavedRun
from codemix_jax.model import ModelConfig


class SavedParams:
    """The params of ``run``'s checkpoint at ``step``, by path (``attention/query/kernel``)."""

    def __init__(self, run: SavedRun, step: int, config: ModelConfig):
        name_format = ocp.path.step.standard_name_format()
        self.directory = name_format.find_step(epath.Path(run.directory), step).path / "state"
        self.config = config
        self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def paths(self) -> dict[str, tuple[int, ...]]:
        """Every saved param's path and shape, from the checkpoint's metadata (no array read)."""
        tree = ocp.PyTreeCheckpointHandler().metadata(self.directory).tree["params"]
        return {
            "/".join(str(key.key) for key in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    def read(self, paths: Sequence[str]) -> list[np.ndarray]:
        """The arrays at ``paths``, whole, in host memory."""
        if not paths:
            return []
        item: dict = {}
        for path in paths:
            *parents, leaf = ["params", *path.split("/")]
            node = item
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = 0  # a placeholder: only the tree's structure matters
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = self._checkpointer.restore(
            self.directory,
            args=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy, partial_restore=True),
        )
        return [_at(restored, ["params", *path.split("/")]) for path in paths]

    def layers(self, sources: Sequence[str]) -> Iterator[tuple[int, list[np.ndarray]]]:
        """``(i, arrays)`` for each layer ``i``: the arrays at ``sources`` within that layer.

        Scanned layers are stacked on a leading axis: each source is read once for all layers.
        """
        num_layers = self.config.num_layers
        if self.config.scan_layers:
            stacked = self.read([f"layers/{source}" for source in sources])
            for i in range(num_layers):
                yield i, [array[i] for array in stacked]
            return
        for i in range(num_layers):
            yield i, self.read([f"layers_{i}/{source}" for source in sources])


def _at(tree: dict, keys: list[str]) -> np.ndarray:
    for key in keys:
        tree = tree[key]
    return tree
