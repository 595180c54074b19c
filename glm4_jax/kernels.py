"""Attention kernels for one device: dense, blockwise (online softmax), and flash kernels for a causal prefill.

The shapes and the visibility rule are those of `glm4_jax.attention.attend`, which chooses among these (and ring
attention, glm4_jax/ring.py, built from the blockwise pieces here): q [B, T, N, H]; k, v [B, S, K, H] with K kv
heads shared by N // K query heads each (never repeated to N heads); q_pos [B, T], k_pos [B, S]. Key s is visible
to query t when 0 <= k_pos[s] <= q_pos[t]; a query with no visible key (padding) gets an arbitrary finite output.
With `layer=i`, k and v are the stacked cache [L, B, S, K, H] and layer i is read block by block, never copied
whole (see docs/LONG_CONTEXT.md).

* `dense_attention`: the full [T, S] score matrix. Short sequences and single-token decode.
* `blockwise_attention`: online softmax in float32 over key blocks of `BLOCK_K` slots for query blocks of
  `BLOCK_Q`, so memory is O(T + S), never T x S; a key block no query of the query block can see is skipped
  (`lax.cond`). Serves long prefill on CPU and chunked prefill / decode against a long cache everywhere.
* `causal_attention` with "cudnn" (GPU) or "splash" (TPU, Pallas): flash kernels for a plain causal mask. They
  apply only when q_pos[b, t] == t and the first T slots hold positions 0..T-1 (a prompt without padding written
  from slot 0); that is checked at run time and anything else falls back to dense/blockwise (`lax.cond`).

`write_kv(ck, cv, k, v, layer, start)` writes new keys and values into the stacked cache [L, B, S, K, H] at
slots [start, start + T) of one layer, in place under jit when the cache is donated.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# A finite "minus infinity" for the dense kernel: a row whose keys are all masked (a padding query) gets uniform
# weights, not NaN. The blockwise kernels use a real -inf with guards instead (a masked row gives 0).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

BLOCK_Q = 512  # query rows per block of the blockwise kernel
BLOCK_K = 512  # key slots per block
DENSE_MAX_SCORES = 1 << 26  # "auto" uses the dense kernel up to B * N * T * S scores (256 MiB in float32)


def select_layer(x: Array, layer: Array | None) -> Array:
    """x[layer] of a stacked cache [L, ...], or x itself when layer is None."""
    return x if layer is None else jax.lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False)


# ---- cache writes -----------------------------------------------------------------------------------------------


def write_kv(ck: Array, cv: Array, k: Array, v: Array, layer: Array, start: Array) -> tuple[Array, Array]:
    """Writes k, v [B, T, K, H] into slots [start, start + T) of layer `layer` of ck, cv [L, B, S, K, H]; with
    `start` [B], row b at its own slots [start[b], start[b] + T).

    One dynamic_update_slice per array (per row: one scatter of B windows, clamped into the slots as the
    dynamic_update_slice is). With the cache sharded along its slots (a `sequence` mesh axis), XLA's SPMD
    partitioner turns the batch-wide one into a local clamped update plus a select on each shard, with no gather
    of the cache (checked on the compiled HLO in tests/test_ring.py).

    The per-row scatter is written out rather than left to `vmap`, which moves the batch axis to the front: XLA then
    gave the cache a batch-major layout inside the layer loop and copied the whole cache into it and back at every
    decode step of the continuous-batching engine (tests/test_decode_hlo.py checks the compiled step).
    """
    return _write(ck, k, layer, start), _write(cv, v, layer, start)


def _write(c: Array, x: Array, layer: Array, start: Array) -> Array:
    x = x.astype(c.dtype)
    zero = jnp.zeros((), jnp.int32)
    if jnp.ndim(start) == 1:
        B = x.shape[0]
        index = jnp.stack([jnp.broadcast_to(layer, (B,)), jnp.arange(B), start], axis=1).astype(jnp.int32)
        dims = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(1, 2, 3), inserted_window_dims=(0, 1), scatter_dims_to_operand_dims=(0, 1, 2)
        )
        out = jax.lax.scatter(
            c, index, x, dims, indices_are_sorted=True, unique_indices=True, mode=jax.lax.GatherScatterMode.CLIP
        )
    else:
        out = jax.lax.dynamic_update_slice(c, x[None], (layer, zero, start, zero, zero))
    return out


def quantize_kv(x: Array) -> tuple[Array, Array]:
    """x [B, T, K, H] -> (int8 values [B, T, K, H], float32 scales [B, T, K, 1]): one scale per token and head,
    absmax / 127 (1 for an all-zero vector)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8), scale


def dequantize_kv(values: Array, scale: Array, layer: Array, dtype) -> Array:
    """Layer `layer` of an int8 cache array [L, B, S, K, H] with its scales [L, B, S, K, 1], as [B, S, K, H]."""
    return (select_layer(values, layer).astype(jnp.float32) * select_layer(scale, layer)).astype(dtype)


def write_rows(pos: Array, new: Array, start: Array) -> Array:
    """Writes new [B, T] into columns [start, start + T) of pos [B, S]; with `start` [B], row b at its own."""
    if jnp.ndim(start) == 1:
        return jax.vmap(lambda p, x, s: jax.lax.dynamic_update_slice(p, x, (s,)))(pos, new, start)
    return jax.lax.dynamic_update_slice(pos, new, (jnp.zeros((), jnp.int32), start))


# ---- dense ------------------------------------------------------------------------------------------------------


def visibility(q_pos: Array, k_pos: Array) -> Array:
    """[B, T, S] bool: key s is visible to query t (0 <= k_pos[s] <= q_pos[t])."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def dense_attention(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array) -> Array:
    """Grouped-query attention with the full score matrix.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (not repeated to N heads); q_pos: [B, T]; k_pos: [B, S].
    Returns:
      [B, T, N, H] in q's dtype. Key s is visible to query t when 0 <= k_pos[s] <= q_pos[t].
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(H))
    scores = jnp.where(visibility(q_pos, k_pos)[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


# ---- blockwise (online softmax) ------------------------------------------------------------------------------------


class QueryBlocks(NamedTuple):
    """Queries cut into nq blocks of bq rows (the last one padded with invisible rows)."""

    q: Array  # [nq, B, bq, K, G, H]
    pos: Array  # [nq, B, bq] int32, -1 on the padding rows
    length: int  # T, the rows before padding


class SoftmaxState(NamedTuple):
    """Running statistics of an online softmax, per query block: out = acc / l, scores relative to m."""

    m: Array  # [nq, B, K, G, bq] float32: the largest score seen (-inf when no visible key yet)
    l: Array  # [nq, B, K, G, bq] float32: sum of exp(score - m)
    acc: Array  # [nq, B, K, G, bq, H] float32: sum of exp(score - m) * value


def query_blocks(q: Array, q_pos: Array, num_kv_heads: int, block_q: int = BLOCK_Q) -> QueryBlocks:
    B, T, N, H = q.shape
    K = num_kv_heads
    bq = min(block_q, T)
    nq = -(-T // bq)
    pad = nq * bq - T
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    q = q.reshape(B, nq, bq, K, N // K, H).transpose(1, 0, 2, 3, 4, 5)
    return QueryBlocks(q=q, pos=q_pos.reshape(B, nq, bq).transpose(1, 0, 2), length=T)


def empty_state(qb: QueryBlocks) -> SoftmaxState:
    nq, B, bq, K, G, H = qb.q.shape
    m = jnp.full((nq, B, K, G, bq), -jnp.inf, jnp.float32)
    return SoftmaxState(m=m, l=jnp.zeros_like(m), acc=jnp.zeros((*m.shape, H), jnp.float32))


def finish(state: SoftmaxState, length: int, dtype) -> Array:
    """acc / l as [B, T, N, H]; a row with no visible key (l == 0) gives zeros."""
    nq, B, K, G, bq, H = state.acc.shape
    out = state.acc / jnp.where(state.l > 0, state.l, 1.0)[..., None]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, H)  # [B, T_pad, N, H]
    return out[:, :length].astype(dtype)


def accumulate(
    state: SoftmaxState,
    qb: QueryBlocks,
    k: Array,
    v: Array,
    k_pos: Array,
    *,
    layer: Array | None = None,
    head_start: Array | None = None,
    block_k: int = BLOCK_K,
) -> SoftmaxState:
    """Folds the keys k, v [B, S, K, H] (or layer `layer` of [L, B, S, K, H]) into the online softmax `state`.

    With `head_start`, only kv heads [head_start, head_start + K) are read, K being the kv heads of `qb`
    (a tensor-parallel shard whose query heads use a subset of replicated kv heads).

    Keys go by blocks of `block_k` slots; the last block is clamped to end at slot S and masks the slots an
    earlier block already covered, so S needs no padding (padding the cache would copy it). A (query block, key
    block) pair with no visible key is skipped by `lax.cond`: its two matmuls and exponentials never run.
    """
    S = k.shape[-3]
    bk = min(block_k, S)
    nk = -(-S // bk)
    scale = 1.0 / math.sqrt(qb.q.shape[-1])

    K = qb.q.shape[3]
    zero = jnp.zeros((), jnp.int32)
    h0 = zero if head_start is None else head_start

    def fetch(x: Array, start: Array) -> Array:  # [B, bk, K, H]
        B, H = x.shape[-4], x.shape[-1]
        if layer is None:
            return jax.lax.dynamic_slice(x, (zero, start, h0, zero), (B, bk, K, H))
        return jax.lax.dynamic_slice(x, (layer, zero, start, h0, zero), (1, B, bk, K, H))[0]

    def one_query_block(args):
        q, q_pos, m, l, acc = args  # q [B, bq, K, G, H], q_pos [B, bq], m, l [B, K, G, bq]

        def key_block(j, carry):
            start = jnp.minimum(j * bk, S - bk)
            kp = jax.lax.dynamic_slice_in_dim(k_pos, start, bk, axis=1)  # [B, bk]
            fresh = start + jnp.arange(bk) >= j * bk  # slots not covered by an earlier block
            visible = fresh & (kp[:, None, :] >= 0) & (kp[:, None, :] <= q_pos[:, :, None])  # [B, bq, bk]

            def compute(carry):
                m, l, acc = carry
                s = jnp.einsum("BTKGH,BSKH->BKGTS", q, fetch(k, start), preferred_element_type=jnp.float32)
                s = jnp.where(visible[:, None, None], s * scale, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no NaN from (-inf) - (-inf)
                p = jnp.exp(s - m_ref[..., None])
                corr = jnp.exp(m - m_ref)
                pv = jnp.einsum(
                    "BKGTS,BSKH->BKGTH", p.astype(v.dtype), fetch(v, start), preferred_element_type=jnp.float32
                )
                return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv

            return jax.lax.cond(jnp.any(visible), compute, lambda c: c, carry)

        return jax.lax.fori_loop(0, nk, key_block, (m, l, acc))

    state = vary_like(state, qb.q, qb.pos, k, v, k_pos)  # inside shard_map: the loop carry varies like its inputs
    m, l, acc = jax.lax.map(one_query_block, (qb.q, qb.pos, *state))
    return SoftmaxState(m, l, acc)


def varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over inside shard_map (empty outside). jax 0.10 keeps them in
    `typeof(x).manual_axis_type.varying`; earlier versions in `typeof(x).vma`."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def vary_like(tree, *refs):
    """Marks the leaves of `tree` as varying over every manual mesh axis any of `refs` varies over, so that a loop
    carry starts with the type its body gives it; a no-op outside shard_map."""
    axes = frozenset().union(*(varying_axes(r) for r in refs))

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    *,
    layer: Array | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> Array:
    """Attention without a [T, S] score matrix: O(block_q * block_k) scores live at a time.

    Same arguments and result as `attend`; padding queries (no visible key) get zeros.
    """
    qb = query_blocks(q, q_pos, k.shape[-2], block_q)
    state = accumulate(empty_state(qb), qb, k, v, k_pos, layer=layer, block_k=block_k)
    return finish(state, qb.length, q.dtype)


# ---- flash kernels for a plain causal mask (cuDNN on GPU, Pallas splash on TPU) --------------------------------


def plain_causal(q_pos: Array, k_pos: Array) -> Array:
    """[] bool: the visibility rule is exactly "slot s visible to query t iff s <= t" on the first T slots and no
    later slot is visible: q_pos[b, t] == t, k_pos[b, s] == s for s < T, and k_pos[b, s] outside [0, T) beyond."""
    T = q_pos.shape[1]
    ar = jnp.arange(T, dtype=jnp.int32)
    rest = k_pos[:, T:]
    return jnp.all(q_pos == ar) & jnp.all(k_pos[:, :T] == ar) & jnp.all((rest < 0) | (rest >= T))


def causal_attention(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    *,
    kernel: str,
    layer: Array | None = None,
    interpret: bool = False,
) -> Array:
    """A flash kernel when `plain_causal` holds at run time, else "dense" / "blockwise" (`lax.cond`: both are
    compiled, one runs). Keys beyond slot T are never read by the flash kernel.

    kernel: "cudnn" (GPU), "splash" (TPU; `interpret=True` runs the Pallas kernel in the interpreter, for tests on
    CPU) or "xla" (jax.nn.dot_product_attention's reference implementation, to test this dispatch on CPU).
    """
    B, T, N, H = q.shape
    S = k.shape[-3]
    if T > S:
        raise ValueError(f"{T} queries against {S} key slots: a causal prefill needs T <= S")

    def first_slots(x):  # [B, T, K, H]: slots [0, T) of the layer, a static slice
        return jax.lax.slice_in_dim(select_layer(x, layer), 0, T, axis=1)

    def fast(q, k, v, q_pos, k_pos):
        kt, vt = first_slots(k), first_slots(v)
        if kernel == "splash":
            return splash_causal(q, kt, vt, interpret=interpret)
        impl = "cudnn" if kernel == "cudnn" else "xla"
        return jax.nn.dot_product_attention(q, kt, vt, scale=1.0 / math.sqrt(H), is_causal=True, implementation=impl)

    def fallback(q, k, v, q_pos, k_pos):
        if B * N * T * S <= DENSE_MAX_SCORES:
            return dense_attention(q, select_layer(k, layer), select_layer(v, layer), q_pos, k_pos)
        return blockwise_attention(q, k, v, q_pos, k_pos, layer=layer)

    return jax.lax.cond(plain_causal(q_pos, k_pos), fast, fallback, q, k, v, q_pos, k_pos)


def splash_causal(q: Array, k: Array, v: Array, *, interpret: bool = False) -> Array:
    """Causal attention with the Pallas TPU splash kernel; q [B, T, N, H], k, v [B, T, K, H] (GQA native).

    T must be a multiple of 128. The kernel applies no scale, so q is scaled first. CI runs it only in the Pallas
    interpreter on CPU (`interpret=True`); it has not run on a TPU.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q.shape
    block = next(b for b in (512, 256, 128) if T % b == 0)
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * N)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(H))).astype(q.dtype)
    out = jax.vmap(kernel)(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
