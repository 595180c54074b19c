"""A Pallas kernel for the skinny matmuls on quantized weights (decode: a few rows of activations), for GPUs.

`qmatmul.linear` blocks the dequantization so that XLA never holds a dequantized matrix; on a GPU that still
writes each dequantized block to memory and reads it back, because XLA does not fuse a convert into the operand
of a matmul. This kernel dequantizes in registers: each program reads a tile of BLOCK_O output columns of the
int8 or int4 values (and their scales) once, converts it next to the dot, and accumulates in float32, so the
weights cross memory once, quantized.

Layout (glm4_jax/quant.py): the contracted axes are flattened to K and the output axes to O, so W is int8 [K, O]
or uint8 pairs [K/2, O] (entries 2r low nibble, 2r + 1 high) with scales [O] or [K/group, O] (int4 groups are
consecutive along the last contracted axis, and stay consecutive along the flattened K). The activations x
[M, K] are padded to M_TILE rows (the smallest dot tile). The grid is (O / BLOCK_O, splits): a split is a range
of K steps (BLOCK_K rows for int8, one group for int4), so that matrices with few output tiles (`down`, O = 4096)
still fill the device; the splits' float32 partial sums are added after the kernel.

`applies(...)` is the condition `qmatmul.linear` checks at trace time: a GPU backend, one device (an unsharded
weight: a mesh would need the kernel under shard_map), at most MAX_M rows, O a multiple of BLOCK_O, K of BLOCK_K
(int8), an int4 group a power of two of at least 32, and a one-time self-check of the kernel on this GPU that
passed (`gpu_ok`; a failure to lower or a wrong result falls back to the XLA path with a warning). On the CPU the
tests run it in Pallas interpret mode (`interpret=True`).
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

Array = jax.Array

BLOCK_O = 128  # output columns per program
BLOCK_K = 128  # int8: contracted rows per step (int4: one group per step)
M_TILE = 16  # rows of the activations tile (the smallest dot tile on GPUs)
MAX_M = 16  # the kernel applies to at most this many rows (decode); more rows are a matmul XLA does well
TARGET_PROGRAMS = 256  # split K until about this many programs run (an H100 / H200 has 132 SMs)
ENABLED = True  # False: qmatmul.linear always takes the XLA path
INTERPRET = False  # the default of `linear(interpret=)`: True runs the kernel in Pallas interpret mode (CPU tests)


def splits(n_o: int, steps: int) -> int:
    """The number of K ranges for `n_o` output tiles and `steps` K steps: enough programs, at least 4 steps each."""
    return max(1, min(math.ceil(TARGET_PROGRAMS / n_o), steps // 4))


def _kernel(*refs, quant: str, steps: int, n_split: int, half: int):
    """One program: output tile pl.program_id(0), K steps [s * steps // n_split, (s + 1) * steps // n_split) of
    split s = pl.program_id(1); writes its float32 partial sums [M_TILE, BLOCK_O] (int8: before the scale)."""
    s = pl.program_id(1)
    lo, hi = s * steps // n_split, (s + 1) * steps // n_split
    if quant == "int8":
        x_ref, w_ref, o_ref = refs

        def step(i, acc):
            x = x_ref[:, pl.ds(i * BLOCK_K, BLOCK_K)]  # [M_TILE, BLOCK_K]
            w = w_ref[pl.ds(i * BLOCK_K, BLOCK_K), :].astype(x.dtype)  # [BLOCK_K, BLOCK_O], exact in bf16
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    else:
        xe_ref, xo_ref, w_ref, s_ref, o_ref = refs

        def step(i, acc):
            xe = xe_ref[:, pl.ds(i * half, half)]  # [M_TILE, group/2]: entries 2r of group i
            xo = xo_ref[:, pl.ds(i * half, half)]  # entries 2r + 1
            p = jax.lax.bitcast_convert_type(w_ref[pl.ds(i * half, half), :], jnp.int8)  # [group/2, BLOCK_O]
            low = jnp.right_shift(jnp.left_shift(p, 4), 4)  # arithmetic shifts sign-extend the nibbles
            high = jnp.right_shift(p, 4)
            part = jnp.dot(xe, low.astype(xe.dtype), preferred_element_type=jnp.float32)
            part += jnp.dot(xo, high.astype(xo.dtype), preferred_element_type=jnp.float32)
            return acc + part * s_ref[pl.ds(i, 1), :].astype(jnp.float32)  # the group's scale, [1, BLOCK_O]

    acc = jax.lax.fori_loop(lo, hi, step, jnp.zeros((M_TILE, BLOCK_O), jnp.float32))
    o_ref[0] = acc


def linear(x: Array, w: Array, scale: Array, *, quant: str, group: int, out_dtype=None, interpret=None) -> Array:
    """x [M, K] @ W -> [M, O] in `out_dtype` (default x's) for W int8 [K, O] with scale [O], or int4 pairs
    uint8 [K/2, O] with scale [K/group, O] (the flattened layout of the module docstring). M <= MAX_M."""
    M, K = x.shape
    O = w.shape[-1]
    xp = jnp.zeros((M_TILE, K), x.dtype).at[:M].set(x)
    n_o = O // BLOCK_O
    if quant == "int8":
        steps = K // BLOCK_K
        args = (xp, w)
        specs = [
            pl.BlockSpec((M_TILE, K), lambda o, s: (0, 0)),
            pl.BlockSpec((K, BLOCK_O), lambda o, s: (0, o)),
        ]
    else:
        steps = K // group
        pairs = xp.reshape(M_TILE, K // 2, 2)
        args = (pairs[..., 0], pairs[..., 1], w, scale)
        specs = [
            pl.BlockSpec((M_TILE, K // 2), lambda o, s: (0, 0)),
            pl.BlockSpec((M_TILE, K // 2), lambda o, s: (0, 0)),
            pl.BlockSpec((K // 2, BLOCK_O), lambda o, s: (0, o)),
            pl.BlockSpec((K // group, BLOCK_O), lambda o, s: (0, o)),
        ]
    n_split = splits(n_o, steps)
    kernel = functools.partial(_kernel, quant=quant, steps=steps, n_split=n_split, half=group // 2)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_split, M_TILE, O), jnp.float32),
        grid=(n_o, n_split),
        in_specs=specs,
        out_specs=pl.BlockSpec((1, M_TILE, BLOCK_O), lambda o, s: (s, 0, o)),
        interpret=INTERPRET if interpret is None else interpret,
        name=f"qmatmul_{quant}",
    )(*args)
    out = jnp.sum(partial, axis=0)[:M]
    if quant == "int8":
        out = out * scale.reshape(1, O).astype(jnp.float32)
    return out.astype(out_dtype or x.dtype)


def fits(M: int, K: int, O: int, quant: str, group: int) -> bool:
    """The shapes the kernel takes (the backend aside)."""
    if M > MAX_M or O % BLOCK_O:
        return False
    if quant == "int8":
        return K % BLOCK_K == 0
    return group >= 32 and group & (group - 1) == 0 and K % group == 0


@functools.cache
def gpu_ok() -> bool:
    """Runs the kernel once on this GPU against numpy (int8 and int4, one small matrix each): False, with a
    warning, when it fails to lower or gives a wrong result."""
    try:
        with jax.ensure_compile_time_eval():
            rng = np.random.default_rng(0)
            x = rng.standard_normal((3, 512)).astype(np.float32)
            q = rng.integers(-8, 8, (512, 256)).astype(np.int8)
            s8 = rng.uniform(0.5, 1.5, 256).astype(np.float32)
            s4 = rng.uniform(0.5, 1.5, (4, 256)).astype(np.float32)
            packed = ((q[0::2].view(np.uint8) & 0x0F) | ((q[1::2].view(np.uint8) & 0x0F) << 4)).astype(np.uint8)
            want8 = x @ (q.astype(np.float32) * s8)
            want4 = x @ (q.astype(np.float32) * np.repeat(s4, 128, axis=0))
            got8 = np.asarray(linear(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s8), quant="int8", group=0))
            got4 = np.asarray(linear(jnp.asarray(x), jnp.asarray(packed), jnp.asarray(s4), quant="int4", group=128))
        for got, want in ((got8, want8), (got4, want4)):
            if not np.allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max()):  # TF32 dots on GPUs
                raise ValueError(f"wrong result (largest difference {np.abs(got - want).max():.3g})")
        return True
    except Exception as e:  # any failure to lower or to run: the XLA path stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"warning: the Pallas quantized matmul failed its check on this GPU ({first}); using XLA", file=sys.stderr
        )
        return False


def applies(M: int, K: int, O: int, quant: str, group: int) -> bool:
    """Whether `qmatmul.linear` takes this kernel (decided at trace time; see the module docstring)."""
    return (
        ENABLED
        and jax.default_backend() == "gpu"
        and jax.device_count() == 1
        and fits(M, K, O, quant, group)
        and gpu_ok()
    )
