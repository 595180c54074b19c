"""Sequence parallelism for long contexts: ring attention for prefill, a sequence-sharded KV cache for decode.

Both run under `jax.shard_map` on the ambient mesh (`jax.set_mesh(mesh)`), over every mesh axis: batch and heads
keep the shardings of the rules table (glm4_jax.sharding.rules: batch -> data/fsdp, heads -> tensor), the
sequence goes on `sequence`. Entry point: `ring_attend`, which `glm4_jax.attention.attend(..., impl="ring")`
calls; without a mesh, or with sequence=1, it is the single-device blockwise kernel.

Prefill (`ring_prefill`, T queries against their own T keys). The sequence is padded to 2n chunks of c tokens
(n = ring size) and laid out zigzag: device i holds chunks i and 2n-1-i, so under a causal mask every device
has the same work. Tokens carry their positions with them and visibility depends on positions only, so the
permutation changes no result: the outputs are permuted back and the padding (position -1) dropped. Each device
keeps its queries and passes its keys/values (K kv heads, never repeated to N) and their positions to the next
device n-1 times (`lax.ppermute`), folding every block it holds into a float32 online softmax.

Decode (`sharded_cache_attention`, T new queries against the S slots of a cache sharded along `sequence`): the
queries are replicated, each device attends to its own slots, and the partial results are merged by
log-sum-exp: pmax of the running max, psum of the rescaled sums and outputs (psum_scatter along T when T
divides by n, for chunked prefill). The cache is read in place, block by block; no device sees another's slots.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from glm4_jax import kernels
from glm4_jax.kernels import Array, QueryBlocks, SoftmaxState
from glm4_jax.sharding.rules import logical_to_spec

SEQUENCE = "sequence"
BLOCK = 512  # rows and slots per block of the per-device kernel in ring prefill


def ring_size(axis: str = SEQUENCE) -> int:
    """Size of `axis` on the ambient mesh; 1 when there is no mesh or no such axis."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(mesh.shape.get(axis, 1))


def ring_attend(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    *,
    layer: Array | None = None,
    axis: str = SEQUENCE,
    zigzag: bool = False,
) -> Array:
    """`attend` with impl="ring": ring prefill when q and k have the same length (T == S), else attention against a
    sequence-sharded cache; the single-device blockwise kernel without a `sequence` axis of size > 1. `zigzag`:
    q, k, v are already in the zigzag layout (see `ring_prefill`)."""
    if ring_size(axis) == 1:
        return kernels.blockwise_attention(q, k, v, q_pos, k_pos, layer=layer)
    if q.shape[1] == k.shape[-3]:
        k, v = kernels.select_layer(k, layer), kernels.select_layer(v, layer)
        return ring_prefill(q, k, v, q_pos, k_pos, axis=axis, zigzag=zigzag)
    return sharded_cache_attention(q, k, v, q_pos, k_pos, layer=layer, axis=axis)


# ---- how batch and heads are split -----------------------------------------------------------------------------


class Heads(NamedTuple):
    """Batch and head sharding inside the shard_map, taken from the rules table."""

    batch: object  # PartitionSpec entry of the batch dim
    q: object  # entry of the query heads dim
    kv: object  # entry of the kv heads dim: == q, or None when the kv heads are replicated ("q_only")
    q_shards: int  # devices the query heads are split over

    @property
    def q_only(self) -> bool:
        return self.q is not None and self.kv is None


def _entry_size(mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in names)


def head_layout(mesh, q: Array, num_kv_heads: int) -> Heads:
    """Splits as the rules table would for activations [B, T, N, H] and a cache [B, S, K, H].

    Query heads on `tensor`, kv heads on `tensor` when it divides them (else replicated: each shard then reads the
    kv heads its query heads use). If the query heads of one shard span kv heads unevenly, heads are replicated.
    """
    B, T, N, H = q.shape
    K = num_kv_heads
    qs = logical_to_spec(("batch", None, "q_heads", "head_dim"), (B, T, N, H), mesh)
    ks = logical_to_spec(("batch", None, "kv_heads", "head_dim"), (B, 1, K, H), mesh)
    heads = Heads(batch=qs[0], q=qs[2], kv=ks[2], q_shards=_entry_size(mesh, qs[2]))
    if heads.kv is not None and heads.kv != heads.q:
        raise ValueError(f"kv heads on {heads.kv} but query heads on {heads.q}: the rules must split both alike")
    if heads.q_only:
        n_loc, G = N // heads.q_shards, N // K
        if n_loc % G and G % n_loc:
            return Heads(batch=heads.batch, q=None, kv=None, q_shards=1)
    return heads


def _local_kv_heads(heads: Heads, N: int, K: int) -> tuple[Array | None, int]:
    """(first kv head, kv heads) this shard reads; the first is None when the kv heads are split like the query
    heads (the shard holds exactly the ones it needs)."""
    if not heads.q_only:
        return None, K // heads.q_shards if heads.kv is not None else K
    n_loc, G = N // heads.q_shards, N // K
    names = (heads.q,) if isinstance(heads.q, str) else tuple(heads.q)
    start = (lax.axis_index(names) * n_loc) // G
    return start.astype(jnp.int32), max(1, n_loc // G)


# ---- prefill: ring attention ----------------------------------------------------------------------------------


def zigzag_order(n: int) -> np.ndarray:
    """Chunk order of the zigzag layout: 2n chunks; device i holds chunks i and 2n-1-i (positions i*2 and i*2+1)."""
    return np.array([c for i in range(n) for c in (i, 2 * n - 1 - i)])


def zigzag_chunk(T: int, n: int, block: int = BLOCK) -> int:
    """Tokens per chunk of the zigzag layout of T tokens on a ring of n: 2n chunks, T padded up to 2n of them; a
    chunk longer than `block` is a whole number of blocks (blocks never straddle two chunks)."""
    c = -(-T // (2 * n))
    return -(-c // block) * block if c > block else c


def zigzag_tokens(T: int, n: int, block: int = BLOCK) -> np.ndarray:
    """The original index of the token at each place of the zigzag layout ([2n * chunk]; T and beyond: padding)."""
    c = zigzag_chunk(T, n, block)
    return (zigzag_order(n)[:, None] * c + np.arange(c)).reshape(-1)


def to_zigzag(x: Array, n: int, fill=0, block: int = BLOCK) -> Array:
    """x [B, T, ...] padded with `fill` to 2n chunks and put in zigzag order along T, once for the whole model
    (`GLM4.__call__`): ring prefill then takes its shards as they are (`ring_prefill(..., zigzag=True)`)."""
    T = x.shape[1]
    idx = zigzag_tokens(T, n, block)
    pad = len(idx) - T
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return jnp.take(x, jnp.asarray(idx), axis=1)


def from_zigzag(x: Array, T: int, n: int, block: int = BLOCK) -> Array:
    """Undoes `to_zigzag`: x [B, 2n * chunk, ...] back in the original order, the padding dropped ([B, T, ...])."""
    return jnp.take(x, jnp.asarray(np.argsort(zigzag_tokens(T, n, block))[:T]), axis=1)


def zigzag_place(t: int, T: int, n: int, block: int = BLOCK) -> int:
    """The place of original token t in the zigzag layout of T tokens."""
    return int(np.argsort(zigzag_tokens(T, n, block))[t])


def _permute_chunks(x: Array, order: np.ndarray) -> Array:
    """Reorders the chunks of the sequence dim (dim 1) of x [B, len(order) * c, ...]."""
    B, T = x.shape[:2]
    chunks = x.reshape(B, len(order), T // len(order), *x.shape[2:])
    return jnp.take(chunks, jnp.asarray(order), axis=1).reshape(x.shape)


def ring_prefill(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    *,
    axis: str = SEQUENCE,
    block: int = BLOCK,
    zigzag: bool = False,
) -> Array:
    """Ring attention of q [B, T, N, H] against k, v [B, T, K, H] over mesh axis `axis` (see module docstring).

    Any T: the sequence is padded to 2n chunks (padding has position -1, invisible both ways). The per-device
    kernel is `kernels.accumulate`, whose `lax.cond` skips (query block, key block) pairs with nothing visible:
    under a causal mask in zigzag order that is half of the blocks at every ring step but the first.

    With `zigzag`, the inputs are already padded and in zigzag order (`to_zigzag`, done once by the model for all
    layers): each device's shard goes in as it is, and the output stays in that order.
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = int(mesh.shape[axis])
    B, T, N, H = q.shape
    K = k.shape[2]
    if zigzag:
        if T % (2 * n):
            raise ValueError(f"ring_prefill(zigzag=True): length {T} is not 2 * {n} chunks; use to_zigzag")
        c = T // (2 * n)
        order = None
    else:
        c = zigzag_chunk(T, n, block)
        pad = 2 * n * c - T
        if pad:
            q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
            q_pos, k_pos = (jnp.pad(p, ((0, 0), (0, pad)), constant_values=-1) for p in (q_pos, k_pos))
        order = zigzag_order(n)
        q, k, v, q_pos, k_pos = (_permute_chunks(x, order) for x in (q, k, v, q_pos, k_pos))

    heads = head_layout(mesh, q, K)
    b = min(block, c)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def body(q, k, v, q_pos, k_pos):  # local: q [B', 2c, N', H], k, v [B', 2c, K', H]
        h0, k_loc = _local_kv_heads(heads, N, K)
        if h0 is not None:  # keep only the kv heads this shard's query heads use: less on the wire
            k, v = (lax.dynamic_slice_in_dim(x, h0, k_loc, axis=2) for x in (k, v))
        qb = kernels.query_blocks(q, q_pos, k_loc, b)
        state = kernels.vary_like(kernels.empty_state(qb), q, k, v, k_pos)  # the loop carry's type

        def step(_, carry):
            state, kv = carry
            nxt = tuple(lax.ppermute(x, axis, perm) for x in kv)  # sent while this block is computed
            return kernels.accumulate(state, qb, *kv, block_k=b), nxt

        state, kv = lax.fori_loop(0, n - 1, step, (state, (k, v, k_pos)))
        state = kernels.accumulate(state, qb, *kv, block_k=b)
        return kernels.finish(state, qb.length, q.dtype)

    seq = P(heads.batch, axis)
    out = jax.shard_map(
        body,
        in_specs=(
            P(heads.batch, axis, heads.q, None),
            P(heads.batch, axis, heads.kv, None),
            P(heads.batch, axis, heads.kv, None),
            seq,
            seq,
        ),
        out_specs=P(heads.batch, axis, heads.q, None),
    )(q, k, v, q_pos, k_pos)
    if order is None:
        return out
    out = _permute_chunks(out, np.argsort(order))
    return out[:, :T]


# ---- decode: attention against a sequence-sharded cache -----------------------------------------------------------


def cache_spec(mesh, k: Array, layer: Array | None) -> P:
    """The rules' PartitionSpec of k: [B, S, K, H], or the stacked cache [L, B, S, K, H] when `layer` is given."""
    axes = ("batch", "cache_seq", "kv_heads", "head_dim")
    if layer is not None:
        axes = ("layers", *axes)
    return logical_to_spec(axes, k.shape, mesh)


def sharded_cache_attention(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    *,
    layer: Array | None = None,
    axis: str = SEQUENCE,
    block_q: int = kernels.BLOCK_Q,
    block_k: int = kernels.BLOCK_K,
) -> Array:
    """q [B, T, N, H] (replicated along `axis`) against a cache k, v [B, S, K, H] (or the stacked [L, B, S, K, H]
    with `layer`) whose slots are sharded along `axis`, merged across devices by log-sum-exp.

    Falls back to the blockwise kernel when the rules leave the slots unsharded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    spec = cache_spec(mesh, k, layer)
    seq_entry = spec[-3]
    if seq_entry is None:
        return kernels.blockwise_attention(q, k, v, q_pos, k_pos, layer=layer, block_q=block_q, block_k=block_k)
    n = _entry_size(mesh, seq_entry)
    B, T, N, H = q.shape
    K = k.shape[-2]
    heads = head_layout(mesh, q, K)
    if heads.kv != spec[-2] or heads.batch != spec[-4]:
        raise ValueError(f"cache spec {spec} does not match the activation layout {heads}")
    scatter = T % n == 0 and T > 1  # results come back split along T (chunked prefill)

    has_layer = layer is not None

    def body(q, q_pos, k, v, k_pos, layer):  # local: q [B', T, N', H], k, v [(L,) B', S/n, K', H]
        h0, k_loc = _local_kv_heads(heads, N, K)
        qb = kernels.query_blocks(q, q_pos, k_loc, block_q)
        state = kernels.empty_state(qb)
        layer = layer if has_layer else None
        state = kernels.accumulate(state, qb, k, v, k_pos, layer=layer, head_start=h0, block_k=block_k)
        return merge(state, qb, seq_entry, scatter, q.dtype)

    layer_arg = layer if has_layer else jnp.zeros((), jnp.int32)
    q_spec = P(heads.batch, None, heads.q, None)
    return jax.shard_map(
        body,
        in_specs=(q_spec, P(heads.batch, None), spec, spec, P(heads.batch, seq_entry), P()),
        out_specs=P(heads.batch, seq_entry if scatter else None, heads.q, None),
    )(q, q_pos, k, v, k_pos, layer_arg)


def merge(state: SoftmaxState, qb: QueryBlocks, axis, scatter: bool, dtype) -> Array:
    """Combines the per-device online-softmax states of the same queries: out = sum_d w_d acc_d / sum_d w_d l_d
    with w_d = exp(m_d - max_d m_d). Returns [B, T, N, H], or its own 1/n of the rows when `scatter`."""
    m_all = lax.pmax(state.m, axis)
    w = jnp.exp(state.m - jnp.where(m_all == -jnp.inf, 0.0, m_all))  # 0 where this device saw no visible key
    acc, l = _rows(state.acc * w[..., None], qb.length), _rows(state.l * w, qb.length)  # [B, T, N, H], [B, T, N]
    if scatter:
        acc = lax.psum_scatter(acc, axis, scatter_dimension=1, tiled=True)
        l = lax.psum_scatter(l, axis, scatter_dimension=1, tiled=True)
    else:
        acc, l = lax.psum(acc, axis), lax.psum(l, axis)
    return (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(dtype)


def _rows(x: Array, length: int) -> Array:
    """Block-major [nq, B, K, G, bq, ...] -> [B, T, K * G, ...]."""
    nq, B, K, G, bq = x.shape[:5]
    x = jnp.moveaxis(x, 4, 1)  # [nq, bq, B, K, G, ...]
    x = jnp.moveaxis(x.reshape(nq * bq, B, K * G, *x.shape[5:]), 0, 1)
    return x[:, :length]
