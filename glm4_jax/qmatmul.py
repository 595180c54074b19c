"""Matmuls that read quantized weights (glm4_jax/quant.py for the formats) without a dequantized copy of them.

`linear(x, w, scale, n_in=, quant=, group=)` computes x [..., C1..Ck] @ W [C1..Ck, O...] for a matrix W stored as
int8 (one scale per output) or as int4 pairs (one scale per group along Ck). Decode reads every weight once per
token, so the weights must stay quantized in memory: a dequantized copy of a matrix would cost more bytes than the
bf16 matrix itself. The product is therefore accumulated over `nb` blocks of Ck, each dequantized on its own
(about BLOCK_BYTES, never the whole matrix; tests/test_quant.py checks the compiled HLO of a decode step).

The blocks are strided: block j holds the rows c of Ck with c % nb == j (for int4, the stored pairs p with
p % nb == j). A mesh axis that splits Ck into contiguous pieces then splits every block the same way, so the
loop indexes an axis no device is split along and the weights are never gathered. `nb` keeps at least 8 rows'
factor of two in each block (MIN_SHARD_FACTOR) so that tensor or fsdp meshes of up to 8 devices divide it.

The integer values are exact in bf16, so each block is converted to the activations' dtype and multiplied in its
matmul with float32 accumulation; the scales apply in float32 (int8: once, to the output; int4: per row of the
block, since the rows of a strided block belong to several groups).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

BLOCK_BYTES = 8 << 20  # the most bytes of one dequantized block
MIN_BLOCKS = 8  # at least this many blocks when the rows allow it
MIN_SHARD_FACTOR = 8  # rows of a block stay divisible by this power of two


def num_blocks(rows: int, bytes_per_row: int) -> int:
    """The number of strided blocks for `rows` stored rows of `bytes_per_row` dequantized bytes each."""
    twos = (rows & -rows).bit_length() - 1  # the power of two in rows
    cap = 1 << max(0, twos - MIN_SHARD_FACTOR.bit_length() + 1)  # blocks keep MIN_SHARD_FACTOR | rows per block
    want = max(MIN_BLOCKS, math.ceil(rows * bytes_per_row / BLOCK_BYTES))
    nb = 1
    while nb < want and nb * 2 <= cap:
        nb *= 2
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
    packed = quant == "int4"
    rows = n // 2 if packed else n  # stored rows along Ck
    per = 2 if packed else 1  # values per stored row
    nb = num_blocks(rows, per * pre * O * jnp.dtype(x.dtype).itemsize)
    bc = rows // nb

    # Rows r = i * nb + j: block j is index j of a [bc, nb] split of the stored rows.
    wb = w.reshape(pre, bc, nb, O)
    xb = x.reshape(M, pre, bc, nb, per)
    if packed:
        sg = scale.reshape(pre, n // group, O)  # stored row r (values 2r, 2r + 1) is in group r // (group // 2)

    def block(j, acc):
        xj = jax.lax.dynamic_index_in_dim(xb, j, axis=3, keepdims=False)  # [M, pre, bc, per]
        wj = jax.lax.dynamic_index_in_dim(wb, j, axis=2, keepdims=False)  # [pre, bc, O]
        if packed:
            sj = jnp.take(sg, (jnp.arange(bc) * nb + j) // (group // 2), axis=1)  # [pre, bc, O]
            wf = unpack_int4(wj).astype(jnp.float32) * sj[:, :, None, :].astype(jnp.float32)  # [pre, bc, 2, O]
            wf = wf.astype(x.dtype)
        else:
            wf = wj.astype(x.dtype)[:, :, None, :]  # [pre, bc, 1, O]
        return acc + jnp.einsum("MPCE,PCEO->MO", xj, wf, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, nb, block, jnp.zeros((M, O), jnp.float32))
    if not packed:
        acc = acc * scale.reshape(1, O).astype(jnp.float32)
    return acc.astype(out_dtype or x.dtype).reshape(*lead, *out_shape)
