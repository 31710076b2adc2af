"""Fused attention kernels that never hold an ``l x l`` buffer: Pallas splash (TPU), flash (GPU).

Both compute exactly what the reference in ``attention.py`` computes (causal, within one packed
document, GQA) from the same ``[b, l, heads, head_dim]`` layout, but tile by tile, so memory grows
with ``l`` rather than ``l**2``. A Pallas kernel is a custom call that XLA cannot partition, so
each runs under ``shard_map`` over the mesh axes the logical rules give the batch and the heads:
every device then runs the kernel on its own rows and heads, which is exact because attention
never mixes rows, and heads sharded in contiguous blocks keep every query head's KV head local.

On CPU the kernels run in Pallas' interpreter inside ``interpret_kernels()`` (tests only: slow).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

# Every sequence length a kernel accepts is a multiple of this: splash's KV compute tile must be a
# multiple of the TPU's 128 lanes, and one row length keeps both kernels' tiles simple.
SEQ_MULTIPLE = 128
# Largest first: big tiles amortise the per-tile overhead (MaxText's splash default is 512).
_SPLASH_TILES = (512, 256, 128)
_GPU_TILE = 128  # forward q and kv tiles; the backward uses the library's defaults (32)

_INTERPRET = contextvars.ContextVar("codemix_attention_interpret", default=False)

Kernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@contextlib.contextmanager
def interpret_kernels() -> Iterator[None]:
    """Run the Pallas kernels in Pallas' interpreter, on any platform (for tests on CPU).

    Read when a function is traced: a function jitted inside this block keeps interpreting.
    """
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpreting() -> bool:
    """Whether ``interpret_kernels()`` is active (then every platform can run every kernel)."""
    return _INTERPRET.get()


def check_seq_len(implementation: str, seq_len: int) -> None:
    """Both kernels tile the sequence in blocks of ``SEQ_MULTIPLE``; name a length they cannot."""
    if seq_len % SEQ_MULTIPLE:
        raise ValueError(
            f"ModelConfig.attention={implementation!r} needs a sequence length that is a multiple "
            f"of {SEQ_MULTIPLE}, got {seq_len}; use attention='xla' or pad the rows"
        )


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Causal, document-masked (GQA) attention with TPU Pallas splash; layout as the reference."""
    check_seq_len("splash", q.shape[1])
    return _sharded(_splash_local)(q, k, v, segment_ids)


def gpu_flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """Causal, document-masked (GQA) attention with the Pallas GPU (Triton) flash kernel."""
    check_seq_len("gpu_flash", q.shape[1])
    return _sharded(_gpu_flash_local)(q, k, v, segment_ids)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """One device's rows and heads. Splash takes one row ``[heads, l, d]`` and does not scale q.

    The causal mask is static (its tile structure lets splash skip tiles above the diagonal); the
    documents come in as segment ids, so the mask never exists as an array. Query head ``h`` reads
    KV head ``h // (heads / kv_heads)``, as in ``jax.nn.dot_product_attention``.
    """
    length, heads = q.shape[1], q.shape[2]
    tile = next(t for t in _SPLASH_TILES if length % t == 0)
    tiles = splash.BlockSizes(
        block_q=tile,
        block_kv=tile,
        block_kv_compute=tile,
        block_q_dkv=tile,
        block_kv_dkv=tile,
        block_kv_dkv_compute=tile,
        block_q_dq=tile,
        block_kv_dq=tile,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(
        mask, block_sizes=tiles, head_shards=1, q_seq_shards=1, interpret=interpreting()
    )
    q = _scaled(q)
    segment_ids = segment_ids.astype(jnp.int32)

    def one_row(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> jax.Array:
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))

    heads_first = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [b, heads, l, d]
    return jnp.swapaxes(jax.vmap(one_row)(*heads_first, segment_ids), 1, 2)


def _gpu_flash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """One device's rows and heads. The kernel has no GQA, so KV heads are repeated per group:
    ``[b, l, heads, d]`` more memory, never ``l x l``."""
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(t, group, axis=2) for t in (k, v))
    length = q.shape[1]
    tiles = gpu_attention.BlockSizes(
        block_q=min(_GPU_TILE, length),
        block_k=min(_GPU_TILE, length),
        block_q_dkv=32,
        block_kv_dkv=32,
        block_q_dq=32,
        block_kv_dq=32,
    )
    return gpu_attention.mha(
        q,
        k,
        v,
        segment_ids.astype(jnp.int32),
        sm_scale=1 / math.sqrt(q.shape[-1]),
        causal=True,
        block_sizes=tiles,
        interpret=interpreting(),
    )


def _scaled(q: jax.Array) -> jax.Array:
    """``q / sqrt(head_dim)`` (the reference's softmax scale), multiplied in float32."""
    return (q.astype(jnp.float32) / math.sqrt(q.shape[-1])).astype(q.dtype)


def _sharded(local: Kernel) -> Kernel:
    """Run ``local`` per device under ``shard_map`` when a mesh is active; as is otherwise.

    The specs come from the active logical-axis rules (``activation_batch``, ``activation_heads``,
    ``activation_kv_heads``), the same names the model constrains its activations with, so the
    kernel sees the layout XLA already has and no data moves.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local
    q_spec, kv_spec = _specs()
    segment_spec = PartitionSpec(q_spec[0], q_spec[1])
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
        out_specs=q_spec,
        check_vma=False,  # Pallas calls carry no varying-axis annotations
    )


def _specs() -> tuple[PartitionSpec, PartitionSpec]:
    """Mesh specs of ``q`` and of ``k``/``v`` under the active rules; refuse layouts the
    per-device kernel cannot be exact on: a sharded sequence or head_dim, or query and KV heads
    sharded over different mesh axes (a query head's KV head would live on another device)."""
    batch_length = ("activation_batch", "activation_length")
    q_spec = nn.logical_to_mesh_axes((*batch_length, "activation_heads", "activation_head_dim"))
    kv_spec = nn.logical_to_mesh_axes((*batch_length, "activation_kv_heads", "activation_head_dim"))
    if q_spec[1] is not None or q_spec[3] is not None:
        raise ValueError(
            f"attention kernels need whole sequences and heads per device, but the logical axis "
            f"rules shard activation_length over {q_spec[1]!r} and activation_head_dim over "
            f"{q_spec[3]!r}"
        )
    if q_spec[2] != kv_spec[2]:
        raise ValueError(
            f"attention kernels need query and KV heads sharded alike (GQA groups stay on one "
            f"device), but the rules give activation_heads {q_spec[2]!r} and activation_kv_heads "
            f"{kv_spec[2]!r}"
        )
    return q_spec, kv_spec
