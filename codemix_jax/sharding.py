"""Device mesh and the logical-axis rules that place parameters, optimizer state and batches on it.

One table (``LOGICAL_AXIS_RULES``, overridable in gin) maps the model's logical axis names to
the mesh axes ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded params and
optimizer state) and ``tensor`` (Megatron-style model parallel). Every divisibility problem is
reported before compiling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gin
import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: Rules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("position", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
)

BATCH_AXES = ("data", "fsdp")


class ShardingError(ValueError):
    """A mesh or array shape that cannot be laid out on the available devices."""


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Replace the single ``-1`` entry with whatever fills ``num_devices``; check the product."""
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {fill} in {sizes}")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ShardingError(f"mesh axis {name}={size} must be positive or -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ShardingError(
                f"mesh {sizes}: the fixed axes (product {known}) do not divide "
                f"the {num_devices} devices"
            )
        sizes = {**sizes, fill[0]: num_devices // known}
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are available"
        )
    return sizes


@gin.configurable
def make_mesh(
    *,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    dcn_data: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Build the (data, fsdp, tensor) mesh; ``dcn_data`` > 1 spreads ``data`` across slices (DCN).

    Within a slice the axes multiply to the slice's device count; ``-1`` fills the rest.
    """
    devices = list(devices if devices is not None else jax.devices())
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices != dcn_data:
        raise ShardingError(
            f"the {len(devices)} devices span {slices} slice(s) but make_mesh.dcn_data={dcn_data}"
        )
    ici = resolve_axis_sizes(
        {"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices) // dcn_data
    )
    ici_shape = tuple(ici[name] for name in MESH_AXES)
    if dcn_data > 1:
        device_grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, (dcn_data, 1, 1), devices=devices, allow_split_physical_axes=True
        )
    elif devices[0].platform == "cpu":
        device_grid = np.asarray(devices).reshape(ici_shape)
    else:
        # Keeps each mesh axis on a ring of the torus where it can; a 64 x 4 mesh on a 16 x 16
        # slice needs a physical axis split in two.
        device_grid = mesh_utils.create_device_mesh(
            ici_shape, devices=devices, allow_split_physical_axes=True
        )
    return Mesh(device_grid, MESH_AXES)


@gin.configurable
def logical_axis_rules(*, rules: Rules = LOGICAL_AXIS_RULES) -> tuple:
    """The active logical-to-mesh rules (a gin hook so experiments can override the table)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[name] for name in names)


def check_divisible(tree_shapes, tree_specs, mesh: Mesh, *, what: str) -> None:
    """Raise ShardingError naming the first array dimension not divisible by its mesh axes."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree_shapes)[0]
    specs = jax.tree_util.tree_leaves(
        tree_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )
    for (path, shape), spec in zip(leaves_with_path, specs, strict=True):
        for dim, axes in zip(getattr(shape, "shape", ()), spec or (), strict=False):
            size = _axis_size(mesh, axes)
            if dim % size:
                raise ShardingError(
                    f"{what} {jax.tree_util.keystr(path)} has a dimension of size {dim} that does "
                    f"not divide mesh axes {axes} (size {size}); mesh {dict(mesh.shape)}"
                )


def unbox_abstract(tree):
    """Strip ``nn.Partitioned`` boxes without the sharding constraint ``nn.unbox`` would apply
    (which fails on shape-only values inside a mesh context)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def logical_to_shardings(abstract_tree, mesh: Mesh, rules: Rules, *, what: str):
    """NamedShardings for ``nn.Partitioned``-boxed abstract values, after a divisibility check."""
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    check_divisible(unbox_abstract(abstract_tree), mesh_specs, mesh, what=what)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def sharded_abstract(boxed_abstract_tree, mesh: Mesh, rules: Rules, *, what: str):
    """The abstract values (shapes carrying their shardings) and the shardings of a boxed
    ``jax.eval_shape`` tree: what a checkpoint restores into and a jit lays out its output by."""
    shardings = logical_to_shardings(boxed_abstract_tree, mesh, rules, what=what)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        unbox_abstract(boxed_abstract_tree),
        shardings,
    )
    return abstract, shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dimension over data and fsdp, replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many shards the batch dimension is split into (``batch_sharding``)."""
    return _axis_size(mesh, BATCH_AXES)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    size = batch_shards(mesh)
    if global_batch_size % size:
        raise ShardingError(
            f"global batch size {global_batch_size} does not divide the data*fsdp mesh size {size}"
        )
