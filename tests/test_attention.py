"""Single-device attention kernels against the dense reference; kernel choice; RoPE precision at 1M positions;
the long-context benchmark's code path at toy size."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from tiny import assert_close_visible, left_pad_positions, random_qkv

from glm4_jax import attention, kernels
from glm4_jax.config import preset
from glm4_jax.model import rope_tables

# ---- blockwise == dense ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,K", [(4, 4), (8, 2), (16, 1)], ids=["mha", "gqa4", "gqa16"])
@pytest.mark.parametrize("pads", [(0, 0), (0, 13)], ids=["causal", "padded"])
def test_blockwise_prefill_equals_dense(N, K, pads):
    B, T = 2, 45  # not a multiple of the blocks: a partial query block and a clamped last key block
    q, k, v = random_qkv(B, T, T, N, K)
    pos = left_pad_positions(T, pads)
    ref = kernels.dense_attention(q, k, v, pos, pos)
    out = jax.jit(lambda *a: kernels.blockwise_attention(*a, block_q=8, block_k=16))(q, k, v, pos, pos)
    assert_close_visible(out, ref, pos, pos, f"blockwise prefill N={N} K={K} pads={pads}")


def _filled_cache(k, v, pos, S, L=3, layer=1):
    """A stacked cache [L, B, S, K, H] holding k, v in slots [0, T) of `layer` (other layers: noise)."""
    B, T, K, H = k.shape
    rng = np.random.RandomState(7)
    ck = jnp.asarray(rng.randn(L, B, S, K, H), jnp.float32).at[layer, :, :T].set(k)
    cv = jnp.asarray(rng.randn(L, B, S, K, H), jnp.float32).at[layer, :, :T].set(v)
    k_pos = jnp.full((B, S), -1, jnp.int32).at[:, :T].set(pos)
    return ck, cv, k_pos


@pytest.mark.parametrize("stacked", [False, True], ids=["layer-slice", "stacked-cache"])
def test_blockwise_chunked_prefill_and_decode_against_cache(stacked):
    """Queries of a chunk (and single decode tokens) against every slot of a cache larger than what is filled."""
    B, T, S, N, K = 2, 40, 72, 8, 2
    q, k, v = random_qkv(B, T, T, N, K, seed=1)
    pos = left_pad_positions(T, (0, 7))
    full = kernels.dense_attention(q, k, v, pos, pos)  # the answer: each query against the whole prompt
    ck, cv, k_pos = _filled_cache(k, v, pos, S)
    layer = jnp.int32(1)

    def run(qc, qp):
        if stacked:
            return kernels.blockwise_attention(qc, ck, cv, qp, k_pos, layer=layer, block_q=8, block_k=16)
        return kernels.blockwise_attention(qc, ck[1], cv[1], qp, k_pos, block_q=8, block_k=16)

    run = jax.jit(run)
    for lo, hi in [(0, 24), (24, 40), (39, 40)]:  # chunked prefill, then a decode token
        out = run(q[:, lo:hi], pos[:, lo:hi])
        assert_close_visible(out, full[:, lo:hi], pos[:, lo:hi], k_pos, f"chunk [{lo}, {hi}) stacked={stacked}")


def test_blockwise_skips_invisible_key_blocks():
    """Whole key blocks invisible to a query block (causal future, empty cache slots) are skipped by lax.cond:
    the result is unchanged, and rows with no visible key at all come out as zeros, not NaN."""
    B, T, N, K = 1, 64, 4, 2
    q, k, v = random_qkv(B, T, T, N, K, seed=2)
    pos = left_pad_positions(T, (40,))  # the first 40 tokens are padding: two key blocks of 16 entirely masked
    out = kernels.blockwise_attention(q, k, v, pos, pos, block_q=16, block_k=16)
    ref = kernels.dense_attention(q, k, v, pos, pos)
    assert_close_visible(out, ref, pos, pos, "skipped blocks")
    np.testing.assert_array_equal(np.asarray(out[:, :40]), 0.0)


def test_blockwise_memory_is_linear_in_length():
    """Compiled temp memory of the blockwise kernel at T = S = 4096 is far below one [T, S] score matrix."""
    B, T, N, K, H = 1, 4096, 2, 1, 16
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.float32)
    pos = jax.ShapeDtypeStruct((B, T), jnp.int32)
    scores_bytes = B * N * T * T * 4
    temps = {}
    for name, fn in [("dense", kernels.dense_attention), ("blockwise", kernels.blockwise_attention)]:
        compiled = jax.jit(fn).lower(q, kv, kv, pos, pos).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
    print(f"one [T, S] score matrix: {scores_bytes / 2**20:.0f} MiB; temp bytes: {temps}")
    assert temps["dense"] >= scores_bytes
    assert temps["blockwise"] < scores_bytes / 16


# ---- flash kernels (cuDNN / splash) and their fallback ----------------------------------------------------------


def test_plain_causal_predicate():
    T, S = 6, 10
    ar = jnp.arange(T)[None]
    k_pos = jnp.full((1, S), -1).at[:, :T].set(ar)
    assert bool(kernels.plain_causal(ar, k_pos))
    assert bool(kernels.plain_causal(ar, ar))
    assert not bool(kernels.plain_causal(ar - 2, ar - 2))  # left padding
    assert not bool(kernels.plain_causal(ar + 4, jnp.arange(S)[None]))  # a chunk after earlier ones
    assert not bool(kernels.plain_causal(ar, k_pos.at[0, 8].set(3)))  # a stale visible slot beyond T


@pytest.mark.parametrize("case", ["causal", "padded", "later-chunk"])
def test_causal_flash_dispatch(case):
    """The cuDNN path's wrapper, run with jax.nn's "xla" kernel on CPU: the plain-causal case goes to the flash
    kernel on the first T slots of a longer stacked cache; padding or a chunk that does not start at position 0
    falls back to the general kernel. Same answers either way."""
    B, T, S, N, K = 2, 16, 24, 8, 2
    q, k, v = random_qkv(B, T, T, N, K, seed=3)
    pos = left_pad_positions(T, (0, 5) if case == "padded" else (0, 0))
    if case == "later-chunk":
        pos = pos + 4
    ref = kernels.dense_attention(q, k, v, pos, pos)
    ck, cv, k_pos = _filled_cache(k, v, pos, S)
    assert bool(kernels.plain_causal(pos, k_pos)) == (case == "causal")
    run = jax.jit(lambda q, qp: kernels.causal_attention(q, ck, cv, qp, k_pos, kernel="xla", layer=jnp.int32(1)))
    assert_close_visible(run(q, pos), ref, pos, pos, f"flash dispatch ({case})")


def test_splash_kernel_in_interpreter():
    """The TPU splash kernel (GQA, causal) run by the Pallas interpreter on CPU equals dense attention."""
    B, T, N, K, H = 1, 256, 4, 2, 128
    q, k, v = random_qkv(B, T, T, N, K, H, seed=5)
    pos = left_pad_positions(T, (0,))
    out = kernels.causal_attention(q, k, v, pos, pos, kernel="splash", interpret=True)
    ref = kernels.dense_attention(q, k, v, pos, pos)
    assert_close_visible(out, ref, pos, pos, "splash (interpreted)")


# ---- attend(): implementation names and "auto" ---------------------------------------------------------------------


def test_attend_implementations_agree_on_cpu():
    B, T, N, K = 2, 24, 8, 2
    q, k, v = random_qkv(B, T, T, N, K, seed=6)
    pos = left_pad_positions(T, (0, 3))
    ref = attention.attend(q, k, v, pos, pos, impl="dense")
    for impl in ("auto", "blockwise", "ring"):  # "ring" without a mesh is the blockwise kernel
        out = attention.attend(q, k, v, pos, pos, impl=impl)
        assert_close_visible(out, ref, pos, pos, f"attend impl={impl}")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.attend(q, k, v, pos, pos, impl="flash")


def test_choose_impl():
    def s(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype)

    assert attention.choose_impl(s(1, 128, 32, 128), s(1, 128, 2, 128)) == "dense"
    assert attention.choose_impl(s(1, 131072, 32, 128), s(1, 131072, 2, 128)) == "blockwise"  # on CPU
    assert attention.choose_impl(s(1, 1, 32, 128), s(1, 131072, 2, 128)) == "dense"  # decode: 4M scores
    assert attention.choose_impl(s(8, 1, 32, 128), s(8, 1048576, 4, 128)) == "blockwise"
    mesh = jax.make_mesh((2,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert attention.choose_impl(s(1, 128, 32, 128), s(1, 128, 2, 128)) == "ring"


def test_write_kv_writes_one_layer_in_place():
    L, B, S, K, H = 3, 2, 10, 2, 4
    ck = jnp.zeros((L, B, S, K, H))
    new = jnp.ones((B, 3, K, H))
    ck2, cv2 = kernels.write_kv(ck, ck, new, 2 * new, jnp.int32(1), jnp.int32(4))
    expect = np.zeros((L, B, S, K, H))
    expect[1, :, 4:7] = 1.0
    np.testing.assert_array_equal(np.asarray(ck2), expect)
    np.testing.assert_array_equal(np.asarray(cv2), 2 * expect)


# ---- RoPE at a million positions --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["glm-4-9b-chat", "glm-4-9b-chat-1m"])
def test_rope_precision_at_max_positions(name):
    """RoPE angles are float32(position) * float32(inv_freq), as in the reference (THUDM) code.

    Positions convert to float32 exactly (< 2**24). The angle pos * inv_freq rounds to float32 (and inv_freq itself
    is a float32 pow, whose last bit differs between numpy, XLA and torch), so near position 1,048,575 the angle is
    off the exact float64 one by up to ~0.04 rad in the fastest-turning dims; dims with small angles (the slow,
    long-range ones) stay exact to ~1e-7. The bound checked element by element: |cos/sin - float64| <=
    pos * inv_freq * 2**-22 (4 float32 ulps of the angle) + 1e-5 (cos/sin of a large float32 argument).
    The numbers are in docs/LONG_CONTEXT.md.
    """
    cfg = preset(name)
    top = cfg.max_seq_len - 1
    pos = np.arange(top - 255, top + 1, dtype=np.int64)
    assert np.array_equal(pos.astype(np.float32).astype(np.int64), pos)
    cos, sin = (np.asarray(x[0], np.float64) for x in rope_tables(jnp.asarray(pos[None], jnp.int32), cfg))
    inv64 = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.rotary_dim, 2) / cfg.rotary_dim)
    ang64 = pos[:, None] * inv64[None]  # exact (float64 is exact to ~1e-10 rad here)
    err = np.maximum(np.abs(cos - np.cos(ang64)), np.abs(sin - np.sin(ang64)))  # [positions, dims]
    bound = ang64 * 2.0**-22 + 1e-5
    slow = ang64[-1] < 1.0  # dims that turn less than a radian over the whole context
    print(
        f"{name} at {top}: max |cos/sin - float64| = {err.max():.3g} (dim {int(err.max(0).argmax())}); "
        f"slow dims ({int(slow.sum())}): {err[:, slow].max() if slow.any() else 0.0:.2g}"
    )
    assert np.all(err <= bound), float((err - bound).max())


# ---- the GPU benchmark's code path, at toy size on CPU --------------------------------------------------------------


@pytest.mark.slow
def test_long_context_benchmark_runs_tiny():
    """benchmarks/long_context.py end to end at toy size on CPU: chunked prefill (96 + 96 + 64), greedy decode."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "benchmarks/long_context.py", "--preset", "tiny", "--tokens", "256", "--decode", "4"]
    result = subprocess.run([*cmd, "--chunk", "96"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    print(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "prefill_s" in result.stdout and "decode_tok_s" in result.stdout


def test_scale_is_inverse_sqrt_head_dim():
    """All kernels use 1/sqrt(H): one visible key with value 1 among keys of value 0 gives its softmax weight."""
    H = 16
    q = jnp.zeros((1, 1, 1, H)).at[..., 0].set(1.0)
    k = jnp.zeros((1, 2, 1, H)).at[:, 0, :, 0].set(2.0)
    v = jnp.zeros((1, 2, 1, H)).at[:, 0, :, 0].set(1.0)
    pos = jnp.array([[1]])
    k_pos = jnp.array([[0, 1]])
    w = math.exp(2.0 / math.sqrt(H)) / (math.exp(2.0 / math.sqrt(H)) + 1.0)
    for impl in ("dense", "blockwise"):
        out = attention.attend(q, k, v, pos, k_pos, impl=impl)
        assert abs(float(out[0, 0, 0, 0]) - w) < 1e-6, impl
