"""Attention kernels behind one signature.

`attend(q, k, v, q_pos, k_pos, impl=...)`: q [B, T, N, H]; k, v [B, S, K, H] with K kv heads shared by N // K
query heads each (never repeated to N heads); q_pos [B, T], k_pos [B, S]. Key s is visible to query t when
0 <= k_pos[s] <= q_pos[t]; a query with no visible key (padding) gets an arbitrary finite output.

`write_kv(ck, cv, k, v, layer, start)` writes new keys and values into the stacked cache [L, B, S, K, H] at
slots [start, start + T) of one layer, in place under jit when the cache is donated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# A finite "minus infinity": a row whose keys are all masked (a padding query) gets uniform weights, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = ("auto", "dense")


def attend(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, *, impl: str = "auto") -> Array:
    if impl in ("auto", "dense"):
        return dense_attention(q, k, v, q_pos, k_pos)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def write_kv(ck: Array, cv: Array, k: Array, v: Array, layer: Array, start: Array) -> tuple[Array, Array]:
    zero = jnp.zeros((), jnp.int32)
    idx = (layer, zero, start, zero, zero)
    ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), idx)
    cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), idx)
    return ck, cv


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
    visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)
