"""Attention behind one signature: `attend(q, k, v, q_pos, k_pos, impl=...)` picks the kernel.

q [B, T, N, H]; k, v [B, S, K, H] with K kv heads shared by N // K query heads each (never repeated to N heads);
q_pos [B, T], k_pos [B, S]. Key s is visible to query t when 0 <= k_pos[s] <= q_pos[t]; a query with no visible
key (padding) gets an arbitrary finite output. With `layer=i`, k and v are the stacked cache [L, B, S, K, H] and
layer i is read block by block, never copied whole (see docs/LONG_CONTEXT.md).

The implementations (`impl`; "auto" picks one from the backend, the shapes and the ambient mesh, see
`choose_impl`): "dense", "blockwise", "cudnn" (GPU) and "splash" (TPU) run on one device (glm4_jax/kernels.py);
"ring" is sequence parallelism over the `sequence` axis of the ambient mesh (`jax.set_mesh`, glm4_jax/ring.py):
ring attention for prefill, a sequence-sharded KV cache for decode. Without a mesh, or with sequence=1, "ring" is
"blockwise".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm4_jax import kernels, ring

Array = jax.Array

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn", "splash", "ring")


def attend(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    *,
    impl: str = "auto",
    layer: Array | None = None,
    zigzag: bool = False,
) -> Array:
    """Grouped-query attention with the visibility rule of the module docstring.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], or the stacked cache [L, B, S, K, H] when `layer` is given.
      q_pos: [B, T] int; k_pos: [B, S] int (negative: padding or an empty slot).
      impl: one of IMPLEMENTATIONS.
      layer: [] int32 index into the leading L axis of k and v, or None.
      zigzag: q and k are in ring attention's zigzag layout (glm4_jax/ring.py `to_zigzag`); only "ring" uses it,
        the other kernels go by positions, so the order of the tokens changes nothing for them.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
    if impl == "auto":
        impl = choose_impl(q, k)
    if impl == "ring":
        return ring.ring_attend(q, k, v, q_pos, k_pos, layer=layer, zigzag=zigzag)
    if impl == "blockwise":
        return kernels.blockwise_attention(q, k, v, q_pos, k_pos, layer=layer)
    if impl in ("cudnn", "splash"):
        return kernels.causal_attention(q, k, v, q_pos, k_pos, kernel=impl, layer=layer)
    k, v = kernels.select_layer(k, layer), kernels.select_layer(v, layer)
    return kernels.dense_attention(q, k, v, q_pos, k_pos)


def choose_impl(q: Array, k: Array) -> str:
    """The kernel "auto" runs for these shapes (static: shapes, backend and ambient mesh only).

    A mesh with sequence > 1 gives "ring". Otherwise a prompt (T > 1 queries) in bf16/fp16 gets the flash kernel
    of the backend ("cudnn" on GPU, "splash" on TPU, both falling back at run time when the mask is not plain
    causal); the rest gets "dense" up to DENSE_MAX_SCORES scores and "blockwise" beyond.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.shape.get("sequence", 1) > 1:
        return "ring"
    B, T, N, H = q.shape
    S = k.shape[-3]
    backend = jax.default_backend()
    if 1 < T <= S and q.dtype in (jnp.bfloat16, jnp.float16):
        if backend == "gpu" and H % 8 == 0 and H <= 128:
            return "cudnn"
        if backend == "tpu" and T % 128 == 0 and H % 128 == 0:
            return "splash"
    return "dense" if B * N * T * S <= kernels.DENSE_MAX_SCORES else "blockwise"
