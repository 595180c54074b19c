"""Tiny configs and helpers shared by the tests (and by tests/multiprocess_worker.py, which runs as a script from
tests/)."""

import jax.numpy as jnp
import numpy as np

from glm4_jax import attention
from glm4_jax.config import Config

# Head counts, ffn and vocab divide 8; 2 kv heads, so tensor=8 replicates them. float32 for exact comparisons.
SHARDABLE = Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    max_seq_len=64,
    eos_token_ids=(1,),
    pad_token_id=0,
    dtype="float32",
)


# A small GQA model (6 query heads on 2 kv heads, no dim divides another): tests/test_model.py, tests/test_generate.py.
GQA6 = Config(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_seq_len=512,
    eos_token_ids=(1, 2),
    pad_token_id=0,
    dtype="float32",
)

# Attention comparisons (tests/test_attention.py, tests/test_ring.py): float32 against dense attention.
ATOL, RTOL = 1e-5, 1e-5


def random_qkv(B, T, S, N, K, H=16, seed=0):
    """q [B, T, N, H] and k, v [B, S, K, H], standard normal float32."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, T, N, H), jnp.float32)
    k = jnp.asarray(rng.randn(B, S, K, H), jnp.float32)
    v = jnp.asarray(rng.randn(B, S, K, H), jnp.float32)
    return q, k, v


def left_pad_positions(T, pads):
    """[len(pads), T] positions with `pads[b]` left-padding tokens (negative positions) on row b."""
    return jnp.stack([jnp.arange(T) - p for p in pads]).astype(jnp.int32)


def assert_close_visible(out, ref, q_pos, k_pos, what):
    """Compares the rows that see at least one key (padding queries may differ); all rows must be finite."""
    out, ref = np.asarray(out), np.asarray(ref)
    seen = np.asarray(attention.visibility(q_pos, k_pos).any(-1))  # [B, T]
    assert np.all(np.isfinite(out)), f"{what}: non-finite output"
    diff = float(np.max(np.abs(out - ref)[seen])) if seen.any() else 0.0
    print(f"{what}: max |diff| on visible rows = {diff:.3g}")
    np.testing.assert_allclose(out[seen], ref[seen], atol=ATOL, rtol=RTOL)
