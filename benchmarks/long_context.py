"""Long-context prefill and decode on one device: prefill seconds, decode tokens/s, peak device memory.

Random full-size weights (the preset's shapes, `cfg.dtype` bf16), a prompt of --tokens random ids prefilled in one
call (on GPU: the cuDNN flash kernel, `attention_impl="auto"`) or in chunks of --chunk tokens (the first chunk
cuDNN, later ones the blockwise kernel against the cache), then --decode greedy tokens in one jitted
`lax.fori_loop` with the cache donated. Compilation is done ahead of time and not counted.

    python benchmarks/long_context.py                        # glm-4-9b-chat, 131072 tokens, 128 decoded (H100)
    python benchmarks/long_context.py --chunk 8192           # chunked prefill
    python benchmarks/long_context.py --preset tiny --tokens 256 --decode 4   # the code path on CPU

Not run in CI on a GPU; tests/test_attention.py runs the tiny preset on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--no-cublas" not in sys.argv:
    # cuBLAS GEMVs are ~2.6x faster than XLA's Triton GEMMs at batch 1 (docs: /work/shared/GLM4_FACTS.md, sec. 5).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from glm4_jax import attention  # noqa: E402
from glm4_jax.config import Config, preset  # noqa: E402
from glm4_jax.fixtures import SHARDABLE  # noqa: E402
from glm4_jax.model import KVCache, abstract_model, init_model  # noqa: E402

# The sharding tests' tiny model with 4 query heads, a 1M-token context and bfloat16 weights.
TINY = SHARDABLE.replace(num_heads=4, rope_theta=10000.0, max_seq_len=1 << 20, dtype="bfloat16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="glm-4-9b-chat", help="a glm4_jax.config preset, or 'tiny'")
    p.add_argument("--tokens", type=int, default=131072, help="prompt length")
    p.add_argument("--decode", type=int, default=128, help="greedy tokens to decode after the prompt")
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk length (0: the whole prompt in one call)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--impl", default="auto", choices=attention.IMPLEMENTATIONS, help="attention kernel")
    p.add_argument("--dtype", default=None, help="override the preset's dtype (bfloat16 by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cublas", action="store_true", help="keep XLA's default (Triton) GEMMs")
    return p.parse_args(argv)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = TINY if args.preset == "tiny" else preset(args.preset)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    B, T, n_new = args.batch, args.tokens, args.decode
    if T + n_new > cfg.max_seq_len:
        # A speed measurement: RoPE is defined at any position, so a prompt of the full context may decode past it.
        print(f"note: {T} + {n_new} tokens run past max_seq_len {cfg.max_seq_len} of {args.preset}; raised for the run")
        cfg = cfg.replace(max_seq_len=T + n_new)
    chunk = args.chunk or T
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), preset {args.preset}, dtype {cfg.dtype}")

    t0 = time.perf_counter()
    abstract = abstract_model(cfg)
    abstract.attention_impl = args.impl
    graphdef, _ = nnx.split(abstract)
    state = jax.jit(lambda: nnx.split(init_model(cfg, args.seed))[1])()  # created on the device, no host copy
    jax.block_until_ready(state)
    print(f"random weights: {time.perf_counter() - t0:.1f} s, peak {gib(peak_bytes())}")

    max_len = T + n_new
    cache = jax.jit(lambda: KVCache.init(cfg, B, max_len))()
    rng = np.random.RandomState(args.seed)
    prompt = jnp.asarray(rng.randint(0, min(cfg.vocab_size, 151329), (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def prefill(state, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache, logits="last")
        return logits, cache

    def decode(state, cache, first, start):
        def step(i, carry):
            cache, token, out = carry
            pos = jnp.full((B, 1), start + i, jnp.int32)
            logits, cache = nnx.merge(graphdef, state)(token, pos, cache, logits="last")
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
            return cache, token, out.at[:, i].set(token[:, 0])

        out = jnp.zeros((B, n_new), jnp.int32)
        cache, _, out = jax.lax.fori_loop(0, n_new, step, (cache, first, out))
        return out, cache

    # Ahead-of-time compilation: one executable per chunk length, one for the decode loop.
    prefill_jit = jax.jit(prefill, donate_argnums=1)
    bounds = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
    compiled = {}
    t0 = time.perf_counter()
    for lo, hi in bounds:
        if hi - lo not in compiled:
            compiled[hi - lo] = prefill_jit.lower(state, cache, prompt[:, lo:hi], positions[:, lo:hi]).compile()
    first = jnp.zeros((B, 1), jnp.int32)
    decode_c = jax.jit(decode, donate_argnums=1).lower(state, cache, first, jnp.int32(T)).compile()
    print(
        f"compile: {time.perf_counter() - t0:.1f} s; prefill attention kernel for the first chunk: "
        f"{_kernel_name(args.impl, B, bounds[0][1], cfg, max_len)}"
    )

    t0 = time.perf_counter()
    for lo, hi in bounds:
        logits, cache = compiled[hi - lo](state, cache, prompt[:, lo:hi], positions[:, lo:hi])
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - t0
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]

    t0 = time.perf_counter()
    out, cache = decode_c(state, cache, first, jnp.int32(T))
    jax.block_until_ready(out)
    decode_s = time.perf_counter() - t0

    print(f"prefill_s: {prefill_s:.3f} ({B * T / prefill_s:,.0f} tok/s, {len(bounds)} call(s) of <= {chunk} tokens)")
    print(f"decode_tok_s: {B * n_new / decode_s:.2f} ({n_new} steps at batch {B}, context {T} -> {T + n_new})")
    print(f"peak_bytes_in_use: {gib(peak_bytes())}")
    print(f"first decoded ids: {np.asarray(out[0, :8]).tolist()}")


def _kernel_name(impl: str, B: int, T: int, cfg: Config, S: int) -> str:
    if impl != "auto":
        return impl
    q = jax.ShapeDtypeStruct((B, T, cfg.num_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
    k = jax.ShapeDtypeStruct((B, S, cfg.num_kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
    return "auto -> " + attention.choose_impl(q, k)


if __name__ == "__main__":
    main()
