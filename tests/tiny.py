"""Helpers shared by the tests (and by tests/multiprocess_worker.py, which runs as a script from tests/). The tiny
configs are fixtures of the package (glm4_jax/fixtures.py)."""

import jax.numpy as jnp
import numpy as np

from glm4_jax import kernels

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
    seen = np.asarray(kernels.visibility(q_pos, k_pos).any(-1))  # [B, T]
    assert np.all(np.isfinite(out)), f"{what}: non-finite output"
    diff = float(np.max(np.abs(out - ref)[seen])) if seen.any() else 0.0
    print(f"{what}: max |diff| on visible rows = {diff:.3g}")
    np.testing.assert_allclose(out[seen], ref[seen], atol=ATOL, rtol=RTOL)


def sharpen(model, factor=10.0):
    """Scales every layer matrix by `factor`, in place: std-0.02 weights give nearly flat logits; larger ones make
    every position matter (generation and batching tests)."""
    for name in ("qkv", "o", "gate_up", "down"):
        w = getattr(model.layers, name)
        w[...] = w[...] * factor
    return model


def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module (registered in sys.modules first: its dataclasses look it up)."""
    import importlib.util
    import pathlib
    import sys

    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
