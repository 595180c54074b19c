"""Ring attention and the sequence-sharded KV cache on 8 fake CPU devices, against single-device dense attention.

Meshes come from glm4_jax.sharding.make_mesh (Auto axes) and set with `jax.set_mesh`, where `attend(...,
impl="ring")` finds them. The last tests check, on the compiled HLO of one decode step, that the cache is
updated in place and never gathered or copied whole.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from tiny import ATOL, RTOL, assert_close_visible, left_pad_positions, random_qkv, sharpen

from glm4_jax import attention, kernels, ring
from glm4_jax.fixtures import SHARDABLE
from glm4_jax.model import KVCache, abstract_model, init_model
from glm4_jax.placement import abstract_params, cache_shardings, init_cache, jit_forward, shard_model
from glm4_jax.sharding import logical_to_spec, make_mesh


def _ring_prefill(q, k, v, pos, block=4):
    return jax.jit(lambda *a: ring.ring_prefill(*a, block=block))(q, k, v, pos, pos)


# ---- prefill: ring attention == dense -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mesh_spec,N,K",
    [
        ("sequence=4,tensor=2", 4, 4),  # MHA, heads split over tensor
        ("sequence=4,tensor=2", 8, 2),  # GQA 4
        ("sequence=4,tensor=2", 16, 1),  # GQA 16: 1 kv head replicated, each shard reads it
        ("sequence=2,tensor=4", 8, 2),  # 2 kv heads on a tensor axis of 4: each shard picks its kv head
        ("sequence=8", 8, 2),
    ],
)
@pytest.mark.parametrize("pads", [(0, 0), (0, 11)], ids=["causal", "padded"])
def test_ring_prefill_equals_dense(mesh_spec, N, K, pads):
    T = 37  # not a multiple of 2 * ring size: padded inside
    q, k, v = random_qkv(2, T, T, N, K)
    pos = left_pad_positions(T, pads)
    ref = kernels.dense_attention(q, k, v, pos, pos)
    with jax.set_mesh(make_mesh(mesh_spec)):
        out = _ring_prefill(q, k, v, pos)
    assert_close_visible(out, ref, pos, pos, f"ring prefill {mesh_spec} N={N} K={K} pads={pads}")


def test_ring_prefill_with_a_fully_masked_shard():
    """Device 0 holds zigzag chunks 0 and 7 (of 8 chunks of 6): make every token there padding (position -1), so
    one shard sends only invisible keys around the ring and owns only padding queries."""
    n, c = 4, 6
    T = 2 * n * c
    q, k, v = random_qkv(2, T, T, 8, 2, seed=1)
    pos = np.stack([np.arange(T), np.arange(T) - c])  # row 1: chunk 0 is left padding
    pos[1, (2 * n - 1) * c :] = -1  # ... and chunk 7 is padding too (allowed by attend's contract)
    pos = jnp.asarray(pos, jnp.int32)
    assert list(ring.zigzag_order(n)[:2]) == [0, 2 * n - 1]
    ref = kernels.dense_attention(q, k, v, pos, pos)
    with jax.set_mesh(make_mesh("sequence=4,tensor=2")):
        out = _ring_prefill(q, k, v, pos, block=c)
    assert_close_visible(out, ref, pos, pos, "ring prefill, shard 0 fully masked in row 1")


def test_zigzag_balances_causal_work():
    """Under a causal mask, zigzag gives every device the same number of visible (query chunk, key chunk) pairs at
    every ring step: 3 at step 0 (two of them diagonal, half visible), then 2 of the 4 pairs, the other 2 being
    skipped by the kernel's lax.cond. A contiguous layout would give device i i+1 busy steps out of n."""
    n = 4
    order = ring.zigzag_order(n)
    assert sorted(order) == list(range(2 * n))
    chunks = order.reshape(n, 2)  # chunks of device i
    for step in range(n):
        busy = []
        for i in range(n):
            j = (i - step) % n  # the device whose keys i holds at this step
            busy.append(sum(int(kc <= qc) for qc in chunks[i] for kc in chunks[j]))
        assert busy == [3 if step == 0 else 2] * n, (step, busy)


def test_ring_without_sequence_axis_is_blockwise():
    q, k, v = random_qkv(1, 20, 20, 4, 2)
    pos = left_pad_positions(20, (0,))
    ref = kernels.dense_attention(q, k, v, pos, pos)
    with jax.set_mesh(make_mesh("tensor=2,data=4")):
        assert ring.ring_size() == 1
        out = jax.jit(lambda *a: attention.attend(*a, impl="ring"))(q, k, v, pos, pos)
    assert_close_visible(out, ref, pos, pos, "ring with sequence=1")


@pytest.mark.parametrize("where", ["first-shard", "last-shard"])
def test_needle_through_the_ring(where):
    """A needle in a haystack without weights: 1000 random keys (small), one planted key aligned with the queries
    (large score) at position 5 (far from the queries at the end, on device 0 in zigzag order) or at position 700
    (on the last device's chunks). Every query after the needle must retrieve the needle's value almost exactly,
    every query before it must not, and the whole output must equal dense attention.

    This proves that a key on a shard other than the query's, reached only after ring rotations, enters the
    softmax with its full weight, and that positions survive padding (1000 -> 1024) and the zigzag permutation.
    """
    T, N, K, H = 1000, 4, 2, 16
    needle = 5 if where == "first-shard" else 700
    rng = np.random.RandomState(2)
    u = rng.randn(H)
    u /= np.linalg.norm(u)
    q = np.broadcast_to(4.0 * u, (1, T, N, H)).copy()
    k = 0.05 * rng.randn(1, T, K, H)
    v = rng.randn(1, T, K, H)
    k[0, needle] = 4.0 * np.sqrt(H) * u  # score 16 against the queries; haystack scores ~0
    target = np.broadcast_to(np.arange(1.0, H + 1.0), (K, H))
    v[0, needle] = target
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    pos = left_pad_positions(T, (0,))
    with jax.set_mesh(make_mesh("sequence=4,tensor=2")):
        out = _ring_prefill(q, k, v, pos, block=32)
    out = np.asarray(out).reshape(T, K, N // K, H)
    err_after = np.abs(out[needle + 1 :] - target[:, None]).max()
    err_before = np.abs(out[:needle] - target[:, None]).max(axis=(1, 2, 3)).min() if needle else np.inf
    print(f"needle at {needle}: retrieval error after it {err_after:.2g}; closest row before it {err_before:.2g}")
    assert err_after < 0.05
    assert needle == 0 or err_before > 1.0
    ref = kernels.dense_attention(q, k, v, pos, pos)
    assert_close_visible(out.reshape(1, T, N, H), ref, pos, pos, f"needle {where}")


# ---- decode: a sequence-sharded cache == dense ------------------------------------------------------------------


def _sharded_cache(mesh, L, B, S, K, H):
    spec = logical_to_spec(KVCache.AXES["k"], (L, B, S, K, H), mesh)
    assert spec[2] == "sequence", spec
    sh = NamedSharding(mesh, spec)
    zeros = jnp.zeros((L, B, S, K, H), jnp.float32)
    pos_sh = NamedSharding(mesh, logical_to_spec(KVCache.AXES["pos"], (B, S), mesh))
    return jax.device_put(zeros, sh), jax.device_put(zeros, sh), jax.device_put(jnp.full((B, S), -1, jnp.int32), pos_sh)


def _write_and_attend(stacked: bool):
    """One layer of a cached step, as the model does it: write the new k, v into the stacked cache, then attend."""

    def step(ck, cv, k_pos, q, k, v, pos, start):
        layer = jnp.int32(1)
        ck, cv = kernels.write_kv(ck, cv, k, v, layer, start)
        k_pos = jax.lax.dynamic_update_slice(k_pos, pos, (0, start))
        if stacked:
            out = attention.attend(q, ck, cv, pos, k_pos, impl="ring", layer=layer)
        else:
            out = attention.attend(q, ck[1], cv[1], pos, k_pos, impl="ring")
        return out, ck, cv, k_pos

    return jax.jit(step, donate_argnums=(0, 1, 2))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked-cache", "layer-slice"])
@pytest.mark.parametrize("mesh_spec,N,K", [("sequence=4,tensor=2", 8, 2), ("sequence=2,tensor=4", 8, 2)])
def test_decode_with_sequence_sharded_cache_equals_dense(stacked, mesh_spec, N, K):
    """Prefill 5 tokens, a chunk of 4 (split back along T: psum_scatter), then 7 single-token steps: slots 5..15
    cross shard boundaries (8 slots per shard with sequence=4). Row 1 is left-padded."""
    T, S, L, H = 16, 32, 3, 16
    q, k, v = random_qkv(2, T, T, N, K, seed=3)
    pos = left_pad_positions(T, (0, 3))
    ref = kernels.dense_attention(q, k, v, pos, pos)
    mesh = make_mesh(mesh_spec)
    step = _write_and_attend(stacked)
    with jax.set_mesh(mesh):
        ck, cv, k_pos = _sharded_cache(mesh, L, 2, S, K, H)
        bounds = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, T)]
        for lo, hi in bounds:
            out, ck, cv, k_pos = step(ck, cv, k_pos, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], pos[:, lo:hi], lo)
            p = pos[:, lo:hi]
            assert_close_visible(out, ref[:, lo:hi], p, pos, f"{mesh_spec} stacked={stacked} slots [{lo}, {hi})")
        assert ck.sharding.spec == logical_to_spec(KVCache.AXES["k"], ck.shape, mesh)
    np.testing.assert_array_equal(np.asarray(ck[1, :, :T]), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(k_pos[:, :T]), np.asarray(pos))


def test_needle_in_a_sharded_cache():
    """Decode-time needle: a cache of 2048 slots over 4 devices, the needle at slot 3 (first shard) and the query
    at slot 1500 (third shard). The per-shard partial softmaxes merged by log-sum-exp must give the needle's
    value: the shards without the needle must not dilute it."""
    S, N, K, H = 2048, 8, 2, 16
    rng = np.random.RandomState(4)
    u = rng.randn(H)
    u /= np.linalg.norm(u)
    k = 0.05 * rng.randn(1, S, K, H)
    v = rng.randn(1, S, K, H)
    k[0, 3] = 4.0 * np.sqrt(H) * u
    v[0, 3] = np.arange(1.0, H + 1.0)
    k_pos = np.where(np.arange(S) <= 1500, np.arange(S), -1)[None]
    q = jnp.asarray(np.broadcast_to(4.0 * u, (1, 1, N, H)), jnp.float32)
    k, v, k_pos = jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(k_pos, jnp.int32)
    q_pos = jnp.array([[1500]], jnp.int32)
    mesh = make_mesh("sequence=4,tensor=2")
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attention.attend(*a, impl="ring"))(q, k, v, q_pos, k_pos)
    err = float(np.abs(np.asarray(out) - np.arange(1.0, H + 1.0)).max())
    print(f"needle retrieved from shard 0 by a query on shard 2: max error {err:.2g}")
    assert err < 0.05
    assert_close_visible(out, kernels.dense_attention(q, k, v, q_pos, k_pos), q_pos, k_pos, "cache needle")


# ---- the full model under sequence=4 x tensor=2 ------------------------------------------------------------------

TINY = SHARDABLE.replace(vocab_size=128, rope_theta=10000.0, max_seq_len=4096)


def _tiny_model():
    return sharpen(init_model(TINY, seed=1), 10.0)  # larger weights: every position matters


def test_model_ring_forward_and_cached_decode_equal_single_device():
    B, T, n_new, max_len = 2, 27, 6, 64
    ids = jnp.asarray(np.random.RandomState(5).randint(0, TINY.vocab_size, (B, T)), jnp.int32)
    pos = left_pad_positions(T, (0, 4))
    real = np.asarray(pos >= 0)

    # single device, dense attention
    model = _tiny_model()
    ref_full, _ = model(ids, pos)
    cache = KVCache.init(TINY, B, max_len)
    logits, cache = model(ids, pos, cache, logits="last")
    ref_steps, ref_ids = [logits], []
    for i in range(n_new):
        tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
        ref_ids.append(tok)
        logits, cache = model(tok, pos[:, -1:] + 1 + i, cache, logits="last")
        ref_steps.append(logits)

    # ring attention, sequence=4 x tensor=2
    mesh = make_mesh("sequence=4,tensor=2")
    sharded = shard_model(_tiny_model(), mesh)
    sharded.attention_impl = "ring"
    params = nnx.to_pure_dict(nnx.state(sharded, nnx.Param))
    with jax.set_mesh(mesh):
        full = jit_forward(sharded, mesh, batch=B)(params, ids, pos)
        step = jit_forward(sharded, mesh, batch=B, max_len=max_len, logits="last")
        cache = init_cache(TINY, mesh, B, max_len)
        logits, cache = step(params, ids, pos, cache)
        steps, got_ids = [logits], []
        for i in range(n_new):
            tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
            got_ids.append(tok)
            logits, cache = step(params, tok, pos[:, -1:] + 1 + i, cache)
            steps.append(logits)
        assert cache.k.sharding.spec[2] == "sequence"

    diff = float(np.abs(np.asarray(full) - np.asarray(ref_full))[real].max())
    print(f"forward: max |ring - dense| over real tokens = {diff:.3g}")
    np.testing.assert_allclose(np.asarray(full)[real], np.asarray(ref_full)[real], atol=ATOL, rtol=RTOL)
    for i, (a, b) in enumerate(zip(steps, ref_steps, strict=True)):
        d = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        print(f"cached step {i}: max |ring - dense| = {d:.3g}")
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=RTOL)
    assert np.array_equal(np.concatenate(got_ids, 1), np.concatenate(ref_ids, 1))


# ---- no per-step copy of the cache: the compiled HLO of one decode step ----------------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter", "collective-broadcast")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+([a-z][a-z0-9-]*)\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def hlo_ops(text: str):
    """(opcode, largest result array in elements, line) for every instruction of an HLO module's text."""
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in _SHAPE.findall(m.group(1))]
            yield m.group(2), max(sizes, default=0), line.strip()


def check_decode_step(compiled, *, layer_elems: int, big: int, cache_bytes: int, what: str, max_temp: int):
    """No collective moves as much as one layer's local cache slice (`layer_elems`); no instruction but the
    in-place update produces an array of `big` elements or more; the donated cache is aliased to the output."""
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    big = [(op, n, line[:160]) for op, n, line in hlo_ops(text) if n >= big]
    collectives = [(op, n) for op, n, _ in hlo_ops(text) if op.removesuffix("-start") in COLLECTIVES]
    print(f"{what}: collectives {sorted(set(collectives))}")
    print(f"  memory: temp {mem.temp_size_in_bytes} B, alias {mem.alias_size_in_bytes} B, local cache {cache_bytes} B")
    for op, n, line in big:
        print(f"  cache-sized: {op} ({n} elements): {line}")
    assert not [c for c in collectives if c[1] >= layer_elems], "a collective moves cache-sized data"
    allowed = {"parameter", "dynamic-update-slice", "get-tuple-element", "tuple", "while", "bitcast", "fusion"}
    assert not [b for b in big if b[0] not in allowed], "an op other than the in-place update makes a cache copy"
    for op, _, line in big:
        if op == "fusion":  # only in-place update fusions may produce a cache-sized array
            assert "dynamic-update-slice" in line or "dynamic_update_slice" in line, line
    assert mem.alias_size_in_bytes >= cache_bytes, "the donated cache is not updated in place"
    assert mem.temp_size_in_bytes < max_temp


def test_decode_step_hlo_stacked_cache_never_copied():
    """A decode step shaped like the model's (scan over layers: write_kv, then attend with layer=i on the stacked
    cache), sequence=4 x tensor=2: temp memory stays below one layer's local slice of the cache."""
    L, B, S, N, K, H = 4, 2, 16384, 8, 2, 16
    mesh = make_mesh("sequence=4,tensor=2")

    def decode_step(ck, cv, k_pos, q, k, v, pos, start):
        k_pos = jax.lax.dynamic_update_slice(k_pos, pos, (0, start))

        def layer(carry, i):
            ck, cv = carry
            ck, cv = kernels.write_kv(ck, cv, k, v, i, start)
            out = attention.attend(q, ck, cv, pos, k_pos, impl="ring", layer=i)
            return (ck, cv), out

        (ck, cv), outs = jax.lax.scan(layer, (ck, cv), jnp.arange(L, dtype=jnp.int32))
        return outs, ck, cv, k_pos

    with jax.set_mesh(mesh):
        ck, cv, k_pos = _sharded_cache(mesh, L, B, S, K, H)
        q = jax.ShapeDtypeStruct((B, 1, N, H), jnp.float32)
        kv = jax.ShapeDtypeStruct((B, 1, K, H), jnp.float32)
        p = jax.ShapeDtypeStruct((B, 1), jnp.int32)
        start = jax.ShapeDtypeStruct((), jnp.int32)
        compiled = jax.jit(decode_step, donate_argnums=(0, 1, 2)).lower(ck, cv, k_pos, q, kv, kv, p, start).compile()
    layer_elems = B * (S // 4) * (K // 2) * H  # one layer of k on one device
    cache_bytes = 2 * L * layer_elems * 4
    check_decode_step(
        compiled,
        layer_elems=layer_elems,
        big=layer_elems,  # not even one layer's slice is copied
        cache_bytes=cache_bytes,
        what="attention-level, stacked cache",
        max_temp=layer_elems * 4,  # less than one layer's local k slice in bytes
    )


@pytest.mark.parametrize("seq,tp", [(4, 2), (2, 4)], ids=["kv-heads-split", "kv-heads-replicated"])
def test_model_decode_step_hlo_has_no_cache_gather(seq, tp):
    """One cached decode step of the full model with attention_impl="ring" (the model passes `ck[i]` to attend),
    with the 2 kv heads split over tensor=2, or replicated over tensor=4: no collective of cache size, no
    all-gather, the cache updated in place, temp memory below half the local cache. The model's `ck[i]` slice
    costs one layer's slice in temp (docs/LONG_CONTEXT.md)."""
    B, max_len = 2, 16384
    cfg = TINY.replace(num_layers=4, max_seq_len=16384)
    mesh = make_mesh(f"sequence={seq},tensor={tp}")
    model = init_model(cfg, seed=0)
    model.attention_impl = "ring"
    shard_model(model, mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with jax.set_mesh(mesh):
        step = jit_forward(model, mesh, batch=B, max_len=max_len, logits="last")
        shardings = cache_shardings(cfg, mesh, B, max_len)
        cache = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(lambda: KVCache.init(cfg, B, max_len)),
            shardings,
        )
        tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
        compiled = step.lower(params, tok, tok, cache).compile()
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    layer_elems = B * (max_len // seq) * (K // tp if K % tp == 0 else K) * H
    cache_bytes = 2 * L * layer_elems * 4
    assert "all-gather" not in compiled.as_text()
    check_decode_step(
        compiled,
        layer_elems=layer_elems,
        big=L * layer_elems,  # no copy of the whole local cache (one layer's slice is, see the docstring)
        cache_bytes=cache_bytes,
        what=f"model, sequence={seq} x tensor={tp}",
        max_temp=cache_bytes // 2,
    )


# ---- context parallelism: the whole model split along T ------------------------------------------------------

CP = SHARDABLE.replace(hidden_size=256, intermediate_size=1024, head_dim=32, max_seq_len=4096)  # 2 layers


def _compiled_cost(mesh, impl, T):
    model = abstract_model(CP)
    model.attention_impl = impl
    tok = jax.ShapeDtypeStruct((1, T), jnp.int32)
    compiled = jit_forward(model, mesh, batch=1).lower(abstract_params(model, mesh), tok, tok).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_context_parallel_prefill_splits_the_flops():
    """On sequence=8 each device embeds, projects and runs the MLP on its own 1/8 of the tokens: XLA's flops per
    device of the compiled cacheless prefill are <= 0.15 of one device's (ring attention splits the rest)."""
    T = 4096
    one = _compiled_cost(make_mesh(None, devices=jax.devices()[:1]), "blockwise", T)
    seq = _compiled_cost(make_mesh("sequence=8"), "ring", T)
    print(f"flops per device: one device {one:.4g}, sequence=8 {seq:.4g} ({seq / one:.3f} of one)")
    assert seq <= 0.15 * one


def test_zigzag_layout_round_trip():
    for T, n, block in ((37, 4, 512), (64, 4, 512), (4096, 8, 512), (5000, 2, 512), (100, 2, 8)):
        x = jnp.arange(T, dtype=jnp.int32)[None]
        z = ring.to_zigzag(x, n, fill=-1, block=block)
        c = ring.zigzag_chunk(T, n, block)
        assert z.shape[1] == 2 * n * c and (c <= block or c % block == 0)
        real = np.asarray(z[0])
        assert sorted(real[real >= 0].tolist()) == list(range(T))  # every token once, padding marked -1
        assert np.array_equal(np.asarray(ring.from_zigzag(z, T, n, block)), np.asarray(x))
        assert int(z[0, ring.zigzag_place(T - 1, T, n, block)]) == T - 1
        dev0 = real[: 2 * c]  # device 0 holds chunks 0 and 2n-1
        assert dev0[0] == 0 and (c * (2 * n - 1) >= T or dev0[c] == c * (2 * n - 1))


@pytest.mark.parametrize("mesh_spec", ["sequence=8", "sequence=4,tensor=2", "data=2,sequence=4"])
def test_context_parallel_logits_and_greedy_ids_equal_single_device(mesh_spec):
    """Cacheless prefill (all logits and the last one) with the hidden states split along T and ring attention
    in zigzag order, against one device with dense attention; then greedy decode from a cache filled by a
    chunked prefill on the same mesh."""
    B, T, n_new, max_len = 2, 40, 4, 64
    ids = jnp.asarray(np.random.RandomState(7).randint(0, TINY.vocab_size, (B, T)), jnp.int32)
    pos = left_pad_positions(T, (0, 5))
    real = np.asarray(pos >= 0)
    model = _tiny_model()
    ref_all, _ = model(ids, pos)
    ref_last = ref_all[:, -1:]

    def greedy(run_step, cache):
        logits, cache = run_step(ids, pos, cache)
        out = []
        for i in range(n_new):
            tok = np.asarray(jnp.argmax(logits[:, -1], -1)[:, None], np.int32)  # a host value, as a server's
            out.append(tok)
            logits, cache = run_step(tok, np.asarray(pos)[:, -1:] + 1 + i, cache)
        return np.concatenate(out, 1), cache

    ref_ids, _ = greedy(lambda t, p, c: model(t, p, c, logits="last"), KVCache.init(TINY, B, max_len))

    mesh = make_mesh(mesh_spec)
    sharded = shard_model(_tiny_model(), mesh)
    params = nnx.to_pure_dict(nnx.state(sharded, nnx.Param))
    with jax.set_mesh(mesh):
        full = jit_forward(sharded, mesh, batch=B)(params, ids, pos)
        last = jit_forward(sharded, mesh, batch=B, logits="last")(params, ids, pos)
        step = jit_forward(sharded, mesh, batch=B, max_len=max_len, logits="last")
        got_ids, cache = greedy(lambda t, p, c: step(params, t, p, c), init_cache(TINY, mesh, B, max_len))
        assert cache.k.sharding.spec[2] == "sequence"
    diff = float(np.abs(np.asarray(full) - np.asarray(ref_all))[real].max())
    print(f"{mesh_spec}: max |context parallel - one device| over real tokens = {diff:.3g}")
    np.testing.assert_allclose(np.asarray(full)[real], np.asarray(ref_all)[real], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref_last), atol=ATOL, rtol=RTOL)
    assert np.array_equal(np.argmax(np.asarray(last)[:, -1], -1), np.argmax(np.asarray(ref_last)[:, -1], -1))
    assert np.array_equal(got_ids, ref_ids)


def test_context_parallel_hidden_states_are_split_along_t():
    """The compiled sequence=8 prefill holds no full-length [T, F] MLP activation on a device: the largest array
    of ffn width [1, rows, F] has T/8 rows (the layer slices of gate and up, [1, D, F], are the other ones)."""
    T = 4096
    mesh = make_mesh("sequence=8")
    model = abstract_model(CP)
    model.attention_impl = "ring"
    tok = jax.ShapeDtypeStruct((1, T), jnp.int32)
    text = jit_forward(model, mesh, batch=1).lower(abstract_params(model, mesh), tok, tok).compile().as_text()
    ffn = [int(m) for m in re.findall(r"\[1,(\d+)," + str(CP.intermediate_size) + r"\]", text)]
    assert T // 8 in ffn, f"no [1, T/8, F] activation in the HLO: {sorted(set(ffn))}"
    assert set(ffn) <= {T // 8, CP.hidden_size}, sorted(set(ffn))


@pytest.mark.slow
def test_cp_compile_benchmark_runs_tiny():
    """benchmarks/cp_compile.py at toy size (the full-size run is a benchmark, not a test): one subprocess per
    device count, abstract inputs, flops per device falling with the ring size."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "benchmarks/cp_compile.py", "--preset", "tiny", "--tokens", "256", "--devices", "2", "4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [*cmd, "--single", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    print(result.stdout)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["devices"] for r in rows] == [1, 2, 4]
    assert rows[2]["flops"] < rows[1]["flops"] < rows[0]["flops"]
    assert all(r["temp_bytes"] > 0 and r["planned_activation_bytes"] > 0 for r in rows)
    assert "sequence=4" in result.stdout
