"""Matmuls that read quantized weights (glm4_jax/quant.py for the formats) without a dequantized copy of them.

`linear(x, w, scale, n_in=, quant=, group=)` computes x [..., C1..Ck] @ W [C1..Ck, O...] for a matrix W stored as
int8 (one scale per output) or as int4 pairs (one scale per group along Ck). Decode reads every weight once per
token, so the weights must stay quantized in memory: a dequantized copy of a matrix would cost more bytes than the
bf16 matrix itself. The product is therefore accumulated over `nb` blocks of Ck, each dequantized on its own
(about BLOCK_BYTES, never the whole matrix; tests/test_quant.py checks the compiled HLO of a decode step).

The blocks are strided: for int8, block j holds the rows c of Ck with c % nb == j; for int4, the groups u with
u % nb == j, counting the groups of every contracted entry (for `o`, the groups of all heads; whole groups, so
each row of a block has its group's scale, applied by a broadcast). A mesh
axis that splits Ck into contiguous pieces then splits every block the same way, so the loop indexes an axis no
device is split along and the weights are never gathered; `num_blocks` keeps each block divisible by 8 such
pieces where the block stays under 4 x BLOCK_BYTES.

On a GPU, for a few rows (decode), `linear` takes the Pallas kernel of glm4_jax/qkernel.py instead (its
`applies` names the conditions), which dequantizes in registers.

The integer values are exact in bf16, so each block is converted to the activations' dtype and multiplied in its
matmul with float32 accumulation; the scales apply in float32 (int8: once, to the output; int4: to the block).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glm4_jax import qkernel

Array = jax.Array

BLOCK_BYTES = 8 << 20  # the most bytes of one dequantized block
MIN_BLOCKS = 8  # at least this many blocks when the units allow it
SHARD_FACTOR = 8  # the units of a block stay divisible by this where blocks stay under 4 x BLOCK_BYTES


def num_blocks(units: int, bytes_per_unit: int) -> int:
    """The number of strided blocks (a power of two dividing `units`) for `units` rows (int8) or groups (int4)
    of `bytes_per_unit` dequantized bytes each: blocks of at most BLOCK_BYTES and at least MIN_BLOCKS of them
    (as far as the units allow), then fewer while that keeps SHARD_FACTOR | units per block, at least 4 blocks,
    and blocks under 4 x BLOCK_BYTES."""
    want = max(MIN_BLOCKS, math.ceil(units * bytes_per_unit / BLOCK_BYTES))
    nb = 1
    while nb < want and units % (2 * nb) == 0:
        nb *= 2
    while (units // nb) % SHARD_FACTOR and nb > 4 and units * bytes_per_unit <= 2 * BLOCK_BYTES * nb:
        nb //= 2
    return nb


def unpack_int4(packed: Array) -> Array:
    """uint8 pairs [..., O] -> int8 [..., 2, O] (the low nibble first), sign-extended."""
    p = jax.lax.bitcast_convert_type(packed, jnp.int8)
    return jnp.stack([jnp.left_shift(p, 4) >> 4, p >> 4], axis=-2)


def linear(x: Array, w: Array, scale: Array, *, n_in: int, quant: str, group: int, out_dtype=None) -> Array:
    """x [..., C1..Ck] @ W [C1..Ck, O...] -> [..., O...] in `out_dtype` (default x's), with W quantized (`quant`
    "int8" or "int4").

    Args:
      x: activations; their last `n_in` axes are the contracted ones.
      w: int8 [C1..Ck, O...], or uint8 [C1..Ck/2, O...] (int4 pairs along Ck).
      scale: int8: [O...]; int4: [C1..Ck/group, O...].
    """
    k = n_in
    lead, xin = x.shape[: x.ndim - k], x.shape[x.ndim - k :]
    out_shape = w.shape[k:]
    O = math.prod(out_shape)
    pre = math.prod(xin[:-1])  # the contracted entries outside Ck (N for the attention output)
    n = xin[-1]
    M = math.prod(lead)
    itemsize = jnp.dtype(x.dtype).itemsize
    x = x.reshape(M, pre, n)
    if qkernel.applies(M, pre * n, O, quant, group):  # a GPU, decode rows: dequantized in registers (qkernel.py)
        w2, s2 = w.reshape(-1, O), scale.reshape(-1, O)
        out = qkernel.linear(x.reshape(M, pre * n), w2, s2, quant=quant, group=group, out_dtype=out_dtype)
        return out.reshape(*lead, *out_shape)

    if quant == "int8":
        nb = num_blocks(n, pre * O * itemsize)
        wb = w.reshape(pre, n // nb, nb, O)  # row c = i * nb + j is wb[:, i, j]
        xb = x.reshape(M, pre, n // nb, nb)

        def block(j, acc):
            xj = jax.lax.dynamic_index_in_dim(xb, j, axis=3, keepdims=False)  # [M, pre, bc]
            wj = jax.lax.dynamic_index_in_dim(wb, j, axis=2, keepdims=False).astype(x.dtype)  # [pre, bc, O]
            return acc + jnp.einsum("MPC,PCO->MO", xj, wj, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, nb, block, jnp.zeros((M, O), jnp.float32))
        acc = acc * scale.reshape(1, O).astype(jnp.float32)
    else:
        U = pre * (n // group)  # groups of all contracted entries (pre x groups along Ck); group u = i * nb + j
        nb = num_blocks(U, group * O * itemsize)
        wb = w.reshape(U // nb, nb, group // 2, O)  # stored pair r of group u
        sb = scale.reshape(U // nb, nb, O)
        xb = x.reshape(M, U // nb, nb, group // 2, 2)  # entry 2r + e of group u

        def block(j, acc):
            xj = jax.lax.dynamic_index_in_dim(xb, j, axis=2, keepdims=False)  # [M, Ub, g/2, 2]
            wj = jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(wb, j, axis=1, keepdims=False), jnp.int8)
            sj = jax.lax.dynamic_index_in_dim(sb, j, axis=1, keepdims=False)[:, None, :].astype(jnp.float32)
            for e, nibble in enumerate((jnp.left_shift(wj, 4) >> 4, wj >> 4)):  # entries 2r (low), 2r + 1 (high)
                wf = (nibble.astype(jnp.float32) * sj).astype(x.dtype)  # [Ub, g/2, O]
                acc = acc + jnp.einsum("MUC,UCO->MO", xj[..., e], wf, preferred_element_type=jnp.float32)
            return acc

        acc = jax.lax.fori_loop(0, nb, block, jnp.zeros((M, O), jnp.float32))
    return acc.astype(out_dtype or x.dtype).reshape(*lead, *out_shape)
