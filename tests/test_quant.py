"""Weight quantization: the formats, the matmuls that read them, the quantized model, the converter and loader, the
compiled decode step, sharding, and bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm4_jax import checkpoint, qmatmul, quant
from glm4_jax.config import MODEL_QUANTIZED, QUANTIZED, Config, ConfigError
from glm4_jax.fixtures import GQA6, SHARDABLE, WIDE, build_demo_checkpoint
from glm4_jax.model import init_model
from glm4_jax.paths import flatten

RNG = np.random.default_rng(0)


def _weights(shape, outliers=0):
    """Normal weights; `outliers` input rows (axis 0) scaled by 20, as real checkpoints have a few."""
    w = RNG.standard_normal(shape).astype(np.float32)
    if outliers:
        w[RNG.choice(shape[0], outliers, replace=False)] *= 20.0
    return w


# ---- the formats ----------------------------------------------------------------------------------------------------


def test_int4_pack_round_trip():
    q = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    q = np.concatenate([q, q[::-1]], axis=0)  # [8, 4]: every value in both nibbles
    packed = quant.pack_int4(q, 0)
    assert packed.dtype == np.uint8 and packed.shape == (4, 4)
    np.testing.assert_array_equal(quant.unpack_int4(packed, 0), q)
    np.testing.assert_array_equal(np.asarray(qmatmul.unpack_int4(jnp.asarray(packed))).reshape(8, 4), q)


def _per_block(a, scheme, group):
    """a [64, 48] -> the entries of each int8 channel or int4 group on axis 1: [channels or groups, entries]."""
    if scheme == "int8":
        return a.T
    return a.reshape(a.shape[0] // group, group, a.shape[1]).transpose(0, 2, 1).reshape(-1, group)


@pytest.mark.parametrize("scheme,group", [("int4", 16), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("outliers", [0, 3])
def test_search_never_worse_than_absmax(scheme, group, outliers):
    w = _weights((64, 48), outliers=outliers)
    v, s = quant.quantize(w, (0,), scheme, group, search=False)
    dq = quant.dequantize(v, s, (0,), scheme, group)
    # Plain absmax: nothing is clipped, so every entry is within half a step of its scale.
    steps = np.broadcast_to(s[None, :] if scheme == "int8" else np.repeat(s, group, axis=0), w.shape)
    half = _per_block(steps, scheme, group)[:, :1] / 2
    err = _per_block(dq - w, scheme, group)
    assert np.all(np.abs(err) <= half * (1 + 1e-6))
    # Ours, per channel or group: squared error never above absmax's, largest error never above absmax's half
    # step, and the largest entry represented as well as absmax represents it (the scales here are float32).
    vc, sc = quant.quantize(w, (0,), scheme, group)
    errc = _per_block(quant.dequantize(vc, sc, (0,), scheme, group) - w, scheme, group)
    assert np.all(np.sum(errc**2, axis=1) <= np.sum(err**2, axis=1) * (1 + 1e-6))
    assert np.all(np.abs(errc) <= half * (1 + 1e-6))
    blocks = _per_block(w, scheme, group)
    top = np.argmax(np.abs(blocks), axis=1)[:, None]
    top_err, top_err_absmax = np.take_along_axis(errc, top, 1), np.take_along_axis(err, top, 1)
    assert np.all(np.abs(top_err) <= np.abs(top_err_absmax) + 1e-6 * np.abs(np.take_along_axis(blocks, top, 1)))
    # Where it differs, the largest entry is negative and sits on the bottom level.
    changed = (
        _per_block(
            np.broadcast_to(sc[None, :] if scheme == "int8" else np.repeat(sc, group, 0), w.shape), scheme, group
        )[:, 0]
        != half[:, 0] * 2
    )
    assert changed.any()  # the search chose the finer step somewhere (else the checks above are empty)
    assert np.all(np.take_along_axis(blocks, top, 1)[changed] < 0)
    q = _per_block(quant.dequantize(vc, np.ones_like(sc), (0,), scheme, group), scheme, group)
    assert np.all(np.take_along_axis(q, top, 1)[changed] == -quant.QMAX[scheme] - 1)
    print(f"{scheme} g={group}: weight MSE absmax {np.mean(err**2):.4g}, ours {np.mean(errc**2):.4g}")


def test_search_spares_outlier_channels():
    # An outlier input row (large in every output column) sets its groups' absmax, and absmax represents it exactly.
    # A clipping search (scales below absmax / qmax, minimizing each group's squared error) clips it in every
    # column: an error coherent across outputs and proportional to that input, the worst positions' error (the
    # reason the quality benchmark's worst KL was above absmax's). Ours never clips the largest entry: the
    # outlier rows' error stays at most absmax's, where a clipping search puts several times more on them.
    w = RNG.standard_normal((256, 256)).astype(np.float32)
    rows = RNG.choice(256, 2, replace=False)
    w[rows] *= 10.0  # as benchmarks/quant_quality.py: groups of 128, a few inputs x 10

    def row_err(search):
        v, s = quant.quantize(w, (0,), "int4", 128, search=search)
        return np.sum((quant.dequantize(v, s, (0,), "int4", 128) - w)[rows] ** 2)

    best = None
    for r in np.linspace(1.0, 0.6, 9):  # a clipping search, written out
        g = w.reshape(2, 128, 256)
        sc = np.max(np.abs(g), axis=1, keepdims=True) * r / 7
        d = np.clip(np.rint(g / sc), -7, 7) * sc - g
        e = np.sum(d**2, axis=1, keepdims=True)
        best = (d, e) if best is None else (np.where(e < best[1], d, best[0]), np.minimum(e, best[1]))
    clipped = np.sum(best[0].reshape(256, 256)[rows] ** 2)
    ours, absmax = row_err(True), row_err(False)
    print(f"outlier rows' squared error: ours {ours:.4g}, absmax {absmax:.4g}, clipping search {clipped:.4g}")
    assert ours <= absmax * (1 + 1e-6) and ours < 0.5 * clipped


def test_search_pays_on_int4_groups():
    # Half the groups (those whose largest entry is negative) get a step finer by 1/7.
    w = _weights((256, 64))
    err = [
        np.mean((quant.dequantize(*quant.quantize(w, (0,), "int4", 32, search=c), (0,), "int4", 32) - w) ** 2)
        for c in (False, True)
    ]
    print(f"int4 g=32 Gaussian: weight MSE absmax {err[0]:.4g}, ours {err[1]:.4g}")
    assert err[1] < 0.95 * err[0]


def test_int8_is_plain_absmax():
    w = _weights((64, 48), outliers=3)
    w[0] = -np.abs(w).max(axis=0) * 2  # every channel's largest entry negative
    v, s = quant.quantize(w, (0,), "int8", 0)
    np.testing.assert_array_equal(s, np.max(np.abs(w), axis=0) / np.float32(127))
    assert v.min() >= -127
    dq = quant.dequantize(v, s, (0,), "int8", 0)
    assert np.all(np.abs(dq - w) <= s / 2 + 1e-6 * np.abs(w))  # float32 rounding of the large entries


def test_search_off_is_absmax(monkeypatch):
    w = _weights((64, 48), outliers=3)
    monkeypatch.setattr(quant, "SEARCH", False)
    for a, b in zip(
        quant.quantize(w, (0,), "int4", 16), quant.quantize(w, (0,), "int4", 16, search=False), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    w[0, :] = -np.abs(w).max(axis=0) * 2  # every group's largest entry negative: the search would change them
    assert not np.array_equal(
        quant.quantize(w, (0,), "int4", 16, search=True)[1], quant.quantize(w, (0,), "int4", 16)[1]
    )


def test_quantize_several_contracted_axes_and_the_layer_axis():
    # The attention output o: [L, N, H, D] contracted over (N, H); int4 groups along H only.
    w = _weights((2, 4, 32, 24))
    v8, s8 = quant.quantize(w, (1, 2), "int8", 0)
    assert v8.shape == w.shape and s8.shape == (2, 24)
    v4, s4 = quant.quantize(w, (1, 2), "int4", 16)
    assert v4.shape == (2, 4, 16, 24) and s4.shape == (2, 4, 2, 24)
    for v, s, scheme in ((v8, s8, "int8"), (v4, s4, "int4")):
        dq = quant.dequantize(v, s, (1, 2), scheme, 16)
        assert np.abs(dq - w).max() < (0.02 if scheme == "int8" else 0.25) * np.abs(w).max()
        # Layer by layer gives the same as the whole stack.
        v0, s0 = quant.quantize(w[:1], (1, 2), scheme, 16)
        np.testing.assert_array_equal(v0, v[:1])
        np.testing.assert_array_equal(s0, s[:1])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(
    "shape,n_in,spec",
    [
        ((64, 96), 1, "MD,DO->MO"),  # q, gate, up, lm_head (2-D)
        ((4, 32, 48), 2, "MNH,NHO->MO"),  # o
        ((48, 6, 16), 1, "MD,DNH->MNH"),  # q with its heads
    ],
)
def test_linear_equals_the_dequantized_matmul(scheme, shape, n_in, spec):
    w = _weights(shape, outliers=2)
    contracted = tuple(range(n_in))
    v, s = quant.quantize(w, contracted, scheme, 16)
    ref = np.einsum(
        spec,
        x := RNG.standard_normal((5, *shape[:n_in])).astype(np.float32),
        quant.dequantize(v, s, contracted, scheme, 16),
    )
    out = qmatmul.linear(jnp.asarray(x), jnp.asarray(v), jnp.asarray(s), n_in=n_in, quant=scheme, group=16)
    # float32 sums in another order (block by block): equal to float32 rounding of the largest output
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


# ---- the Pallas kernel (glm4_jax/qkernel.py), in interpret mode on the CPU -----------------------------------------


@pytest.mark.parametrize(
    "scheme,M,K,O,group",
    [
        ("int8", 1, 256, 256, 128),  # one K step per split
        ("int8", 5, 1024, 128, 128),  # one output tile: K split in two ranges
        ("int4", 1, 512, 384, 128),  # GLM-4's group size
        ("int4", 3, 256, 256, 32),  # 8 groups in 2 splits
        ("int4", 16, 512, 128, 64),  # the most rows it takes
    ],
)
def test_pallas_kernel_equals_the_dequantized_matmul(scheme, M, K, O, group):
    from glm4_jax import qkernel

    w = _weights((K, O), outliers=2)
    v, s = quant.quantize(w, (0,), scheme, group)
    x = RNG.standard_normal((M, K)).astype(np.float32)
    ref = x @ quant.dequantize(v, s, (0,), scheme, group)
    assert qkernel.fits(M, K, O, scheme, group)
    out = qkernel.linear(jnp.asarray(x), jnp.asarray(v), jnp.asarray(s), quant=scheme, group=group, interpret=True)
    assert out.shape == (M, O) and out.dtype == jnp.float32
    # float32 sums in another order: within float32 rounding of the largest output
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())
    # bf16 activations, as in the model: the XLA path and the kernel round differently (the XLA int4 path rounds
    # each dequantized weight to bf16; the kernel applies the scale to the float32 sums), both near float32
    xb = jnp.asarray(x, jnp.bfloat16)
    exact = np.asarray(xb, np.float32) @ quant.dequantize(v, s, (0,), scheme, group)
    kern = qkernel.linear(xb, jnp.asarray(v), jnp.asarray(s), quant=scheme, group=group, interpret=True)
    xla = qmatmul.linear(xb, jnp.asarray(v), jnp.asarray(s), n_in=1, quant=scheme, group=group)
    assert kern.dtype == jnp.bfloat16
    for got in (kern, xla):  # bf16 output rounding (2^-8 relative) plus the weights' bf16 rounding (int4 XLA)
        np.testing.assert_allclose(np.asarray(got, np.float32), exact, rtol=1e-2, atol=1e-2 * np.abs(exact).max())


def test_linear_takes_the_kernel_where_it_applies(monkeypatch):
    # The dispatch: with the GPU-only conditions granted, qmatmul.linear hands decode rows of any layout (here o,
    # two contracted axes and int4 groups along H; and q with its heads as outputs) to the kernel, and keeps the
    # XLA path past MAX_M rows.
    from glm4_jax import qkernel

    assert not qkernel.applies(1, 256, 256, "int8", 128)  # on this CPU: never
    calls = []
    kernel = qkernel.linear

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return kernel(*args, interpret=True, **kw)

    for scheme in ("int8", "int4"):
        for shape, n_in, spec in (((4, 64, 128), 2, "MNH,NHO->MO"), ((128, 2, 64), 1, "MD,DNH->MNH")):
            w = _weights(shape, outliers=2)
            contracted = tuple(range(n_in))
            v, s = quant.quantize(w, contracted, scheme, 32)
            dq = quant.dequantize(v, s, contracted, scheme, 32)
            for M in (2, qkernel.MAX_M + 1):
                x = RNG.standard_normal((M, *shape[:n_in])).astype(np.float32)
                with monkeypatch.context() as m:
                    m.setattr(qkernel, "applies", lambda M, K, O, quant, group: qkernel.fits(M, K, O, quant, group))
                    m.setattr(qkernel, "linear", counting)
                    calls.clear()
                    out = qmatmul.linear(
                        jnp.asarray(x), jnp.asarray(v), jnp.asarray(s), n_in=n_in, quant=scheme, group=32
                    )
                assert len(calls) == (1 if M <= qkernel.MAX_M else 0), (scheme, shape, M)
                ref = np.einsum(spec, x, dq)
                np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


def test_num_blocks_keeps_shardable_blocks():
    assert qmatmul.num_blocks(4096, 13696 * 2) == 16  # int8 gate rows: 112 MB of bf16 in blocks of 7 MB
    assert qmatmul.num_blocks(13696, 4096 * 2) == 16  # int8 down rows: 13696 = 2^7 * 107, 856 rows a block
    assert qmatmul.num_blocks(64, 96 * 4) == 8  # small matrices still come in 8 blocks
    assert qmatmul.num_blocks(107, 8) == 1  # odd rows: one block
    assert qmatmul.num_blocks(32, 128 * 13696 * 2) == 4  # int4 gate groups: 8 groups (28 MB) a block
    assert qmatmul.num_blocks(32, 128 * 4096 * 2) == 4  # int4 o: 32 heads of one group each, 8 heads a block
    assert qmatmul.num_blocks(32, 128 * 151552 * 2) == 32  # int4 lm_head: too big for 8 groups, one group a block
    for units, nbytes in ((4096, 151552 * 2), (6848, 4096 * 4), (2048, 13696 * 4), (32, 128 * 4096 * 2)):
        nb = qmatmul.num_blocks(units, nbytes)
        assert units % nb == 0 and (units // nb) % 8 == 0


# ---- the config ------------------------------------------------------------------------------------------------------


def test_stored_layout_bytes_of_glm_4_9b():
    from glm4_jax.config import np_dtype, preset

    cfg = preset("glm-4-9b-chat")
    nbytes = {}
    for scheme in (None, "int8", "int4"):
        layout = cfg.replace(quant=scheme).stored_layout()
        nbytes[scheme] = sum(math.prod(s) * np_dtype(d).itemsize for s, _, d in layout.values())
    print({k: f"{v / 1e9:.2f} GB" for k, v in nbytes.items()})
    assert nbytes[None] == pytest.approx(18.80e9, rel=1e-3)
    assert nbytes["int8"] <= 10.2e9 and nbytes["int4"] <= 6.0e9  # the targets


def test_bad_scheme_and_group_size_name_the_tensor():
    with pytest.raises(ConfigError, match="int8, int4"):
        GQA6.replace(quant="int3")
    with pytest.raises(ConfigError, match=r"layers/q \(embed = 48\)"):
        GQA6.replace(quant="int4", group_size=32)
    with pytest.raises(ConfigError, match="even"):
        GQA6.replace(quant="int4", group_size=3)


# ---- the model -------------------------------------------------------------------------------------------------------


def _tokens(cfg, B=2, T=40):
    tok = jnp.asarray(RNG.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    return tok, jnp.broadcast_to(jnp.arange(T), (B, T))


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "dense"
    model = init_model(GQA6, 0)
    checkpoint.save(path, model, GQA6)
    return path, model


@pytest.mark.parametrize("scheme,group,tol", [("int8", 128, 0.02), ("int4", 16, 0.25)])
def test_quantized_model_against_dense_and_numpy(dense_ckpt, scheme, group, tol):
    path, dense = dense_ckpt
    model = checkpoint.load(path, quantize=scheme, group_size=group)
    assert model.cfg.quant == scheme and model.layers.qkv[...].dtype == (jnp.int8 if scheme == "int8" else jnp.uint8)
    tok, pos = _tokens(GQA6)
    ref, _ = dense(tok, pos)
    out, _ = model(tok, pos)
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    print(f"{scheme}: max |logits - dense| / max |dense| = {rel:.3g}")
    assert rel < tol
    # The same model with every matrix dequantized in numpy gives the same logits: the matmuls read the format.
    params = dict(flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    deq = {}
    for name, arr in flatten(nnx.to_pure_dict(nnx.state(dense, nnx.Param))):
        c = MODEL_QUANTIZED.get(name)  # the model's tree: qkv and gate_up fused
        deq[name] = (
            arr
            if c is None
            else quant.dequantize(np.asarray(params[name]), np.asarray(params[name + "_scale"]), c, scheme, group)
        )
    from glm4_jax.paths import unflatten

    state = nnx.state(dense, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten((k, jnp.asarray(v, jnp.float32)) for k, v in deq.items()))
    graphdef, _ = nnx.split(dense)
    ref_q, _ = nnx.merge(graphdef, state)(tok, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_q), rtol=2e-5, atol=2e-5)


def test_cached_decode_equals_full_forward_quantized(dense_ckpt):
    from glm4_jax.model import KVCache

    model = checkpoint.load(dense_ckpt[0], quantize="int4", group_size=16)
    tok, pos = _tokens(GQA6, B=1, T=12)
    full, _ = model(tok, pos)
    cache = KVCache.init(GQA6, 1, 16)
    _, cache = model(tok[:, :8], pos[:, :8], cache)
    steps = []
    for t in range(8, 12):
        logits, cache = model(tok[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full[:, 8:]), rtol=1e-5, atol=1e-5)


def test_already_quantized_and_bad_arguments_on_load(tmp_path, dense_ckpt):
    q = tmp_path / "q"
    checkpoint.save(q, checkpoint.load(dense_ckpt[0], quantize="int8"), GQA6.replace(quant="int8"))
    assert json.loads((q / "manifest.json").read_text())["quantization"] == {"scheme": "int8", "group_size": 128}
    model = checkpoint.load(q)  # a quantized checkpoint loads as it is
    assert model.cfg.quant == "int8"
    with pytest.raises(checkpoint.CheckpointError, match="quantized already"):
        checkpoint.load(q, quantize="int4")
    with pytest.raises(ConfigError, match="group size must be an even integer >= 2, got 7"):
        checkpoint.load(dense_ckpt[0], quantize="int4", group_size=7)


# ---- the compiled decode step ----------------------------------------------------------------------------------------


def _decode_step_float_shapes(cfg) -> set[tuple[int, ...]]:
    """The shapes (leading 1s dropped) of every float array in the compiled one-token decode step of a random model
    of `cfg`."""
    from glm4_jax.model import KVCache

    model = init_model(cfg, 0)
    graphdef, state = nnx.split(model)
    cache = KVCache.init(cfg, 1, 32)

    def step(state, tok, pos, cache):
        return nnx.merge(graphdef, state)(tok, pos, cache, logits="last")

    tok = jnp.zeros((1, 1), jnp.int32)
    compiled = jax.jit(step, donate_argnums=(3,)).lower(state, tok, tok, cache).compile()
    shapes = set()
    for dims in re.findall(r"\b(?:f32|bf16|f16)\[([0-9,]+)\]", compiled.as_text()):
        shape = tuple(int(d) for d in dims.split(","))
        while shape and shape[0] == 1:
            shape = shape[1:]
        shapes.add(shape)
    return shapes


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_step_never_holds_a_dequantized_matrix(scheme, monkeypatch):
    # WIDE: every layer matrix holds 256 x 256 entries; blocks are at most a quarter of one. The embedding table
    # (and the same-sized lm_head) is the one float array of at least that size the step has by right.
    cfg = WIDE.replace(quant=scheme, group_size=64)
    matrix = min(math.prod(cfg.param_layout()[p][0][1:]) for p in QUANTIZED if p.startswith("layers/"))
    embed = math.prod(cfg.param_layout()["embed"][0])

    def big(shapes):
        return sorted(s for s in shapes if math.prod(s) >= matrix and math.prod(s) != embed)

    found = big(_decode_step_float_shapes(cfg))
    print(f"{scheme}: float arrays of at least {matrix} entries in the decode step, besides the embedding: {found}")
    assert not found

    # The control: a matmul that dequantizes the whole matrix first is caught by the same check.
    def dequantize_first(x, w, scale, *, n_in, quant, group, out_dtype=None):
        ax = n_in - 1
        if quant == "int4":
            p = jax.lax.bitcast_convert_type(w, jnp.int8)
            vals = jnp.stack([jnp.left_shift(p, 4) >> 4, p >> 4], axis=ax + 1)
            vals = vals.reshape(*w.shape[:ax], 2 * w.shape[ax], *w.shape[ax + 1 :])
            s = jnp.repeat(scale, group, axis=ax)
        else:
            vals, s = w, scale.reshape((1,) * n_in + scale.shape)
        wf = (vals.astype(jnp.float32) * s.astype(jnp.float32)).astype(x.dtype)
        return jnp.tensordot(x, wf, axes=n_in).astype(out_dtype or x.dtype)

    monkeypatch.setattr(qmatmul, "linear", dequantize_first)
    assert big(_decode_step_float_shapes(cfg))


# ---- on a mesh -------------------------------------------------------------------------------------------------------

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@needs_8
@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 8)])
@pytest.mark.parametrize("mesh_spec", ["tensor=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_sharded_quantized_model_equals_one_device(tmp_path_factory, scheme, group, mesh_spec):
    from glm4_jax.placement import jit_forward, mesh_kv_copies, param_tree
    from glm4_jax.sharding import make_mesh

    path = tmp_path_factory.mktemp("qs") / "dense"
    checkpoint.save(path, init_model(SHARDABLE, 1), SHARDABLE)
    one = checkpoint.load(path, quantize=scheme, group_size=group)
    mesh = make_mesh(mesh_spec)
    sharded = checkpoint.load(path, mesh=mesh, quantize=scheme, group_size=group)
    # Every scale is split like its matrix along the logical axes they share.
    layout = sharded.cfg.model_layout(mesh_kv_copies(sharded.cfg, mesh))
    params = dict(flatten(param_tree(sharded)))
    for name in MODEL_QUANTIZED:
        (_, m_axes, _), (_, s_axes, _) = layout[name], layout[name + "_scale"]
        m_spec = dict(zip(m_axes, tuple(params[name].sharding.spec) + (None,) * 4, strict=False))
        s_spec = dict(zip(s_axes, tuple(params[name + "_scale"].sharding.spec) + (None,) * 4, strict=False))
        assert all(s_spec[a] == m_spec[a] for a in s_axes), (name, m_spec, s_spec)
    scales = [params[name + "_scale"] for name in MODEL_QUANTIZED]
    assert any(x.sharding.shard_shape(x.shape) != x.shape for x in scales)  # and some are split
    tok, pos = _tokens(SHARDABLE, B=2, T=16)
    ref, _ = one(tok, pos)
    out = jit_forward(sharded, mesh, batch=2)(param_tree(sharded), tok, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


# ---- the converter and the CLIs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"))


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 16)])
def test_converter_quantizes_as_the_loader_does(demo, tmp_path, scheme, group):
    src = demo.parent / "thudm"
    dst = tmp_path / scheme
    proc = _run("glm4_jax.convert", src, dst, "--quantize", scheme, "--group-size", group, "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": scheme, "group_size": group}
    converted = checkpoint.load(dst)
    loaded = checkpoint.load(demo, quantize=scheme, group_size=group)
    a = dict(flatten(nnx.to_pure_dict(nnx.state(converted, nnx.Param))))
    b = dict(flatten(nnx.to_pure_dict(nnx.state(loaded, nnx.Param))))
    assert a.keys() == b.keys() and any(k.endswith("_scale") for k in a)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize(
    "scheme,group,chunk_bytes", [("int8", 128, None), ("int4", 16, None), ("int8", 0, 4096), ("int4", 16, 4096)]
)
def test_converter_searches_each_scale_once(demo, tmp_path, monkeypatch, scheme, group, chunk_bytes):
    # The values and the scales of a matrix are separate arrays written chunk by chunk; each scale is searched
    # once (by whichever chunk needs it first), also with chunks small enough to split the contracted axes and
    # to cut values and scales apart differently. The result equals quantizing each matrix whole.
    from convert.pipeline import convert

    searched = []
    search = quant.search_scale

    def counting(w, contracted, *args, **kw):
        scale = search(w, contracted, *args, **kw)
        searched.append((w.shape, scale.size))
        return scale

    monkeypatch.setattr(quant, "search_scale", counting)
    if chunk_bytes:
        monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk_bytes)
    group = group or 128
    dst = convert(
        str(demo.parent / "thudm"),
        str(tmp_path / scheme),
        quantize=scheme,
        group_size=group,
        hash_files=False,
        progress=False,
    )
    cfg = Config.from_file(dst / checkpoint.CONFIG)
    stored = cfg.stored_layout()
    expected = sum(math.prod(stored[k + "_scale"][0]) for k in QUANTIZED if k + "_scale" in stored)
    assert sum(n for _, n in searched) == expected, (len(searched), expected)
    monkeypatch.setattr(quant, "search_scale", search)
    converted = checkpoint.load(dst)
    loaded = checkpoint.load(demo, quantize=scheme, group_size=group)
    a = dict(flatten(nnx.to_pure_dict(nnx.state(converted, nnx.Param))))
    b = dict(flatten(nnx.to_pure_dict(nnx.state(loaded, nnx.Param))))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_generate_and_chat_on_an_int4_checkpoint(demo, tmp_path):
    dst = tmp_path / "int4"
    assert (
        _run("glm4_jax.convert", demo.parent / "thudm", dst, "--quantize", "int4", "--group-size", 16, "-q").returncode
        == 0
    )
    proc = _run(
        "glm4_jax.generate", "--ckpt", dst, "--chat", "Hello there", "--max-new-tokens", 6, "--temperature", 0, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(record["ids"]) >= 1
    from glm4_jax.api import GLM4Chat

    chat = GLM4Chat.from_checkpoint(dst)
    text = chat.chat("Hello there", temperature=0, max_new_tokens=6)
    assert chat.last_result.ids[0] == record["ids"] and isinstance(text, str)
    # Quantized on load from the bf16 checkpoint: the same tokens.
    chat2 = GLM4Chat.from_checkpoint(demo, quantize="int4", group_size=16)
    chat2.chat("Hello there", temperature=0, max_new_tokens=6)
    assert chat2.last_result.ids[0] == record["ids"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--quantize", "int3"], "invalid choice: 'int3'"),
        (["--quantize", "int4", "--group-size", "48"], "layers/q (embed = 64)"),
    ],
)
def test_convert_bad_quantization_writes_nothing(demo, tmp_path, args, needle):
    dst = tmp_path / "out"
    proc = _run("glm4_jax.convert", demo.parent / "thudm", dst, *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert not dst.exists() and not list(tmp_path.glob(".out*"))


def test_generate_refuses_to_quantize_a_quantized_checkpoint(demo, tmp_path):
    dst = tmp_path / "int8"
    assert _run("glm4_jax.convert", demo.parent / "thudm", dst, "--quantize", "int8", "-q").returncode == 0
    proc = _run("glm4_jax.generate", "--ckpt", dst, "--prompt-ids", "5,6", "--quantize", "int4")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "quantized already" in proc.stderr


# ---- the int8 KV cache -----------------------------------------------------------------------------------------------


def test_int8_kv_cache_decode_and_its_memory():
    from glm4_jax.model import KVCache

    model = init_model(GQA6, 0)
    tok, pos = _tokens(GQA6, B=2, T=24)
    full, _ = model(tok, pos)
    outs = {}
    for dtype in ("float32", "int8"):
        cache = KVCache.init(GQA6, 2, 32, dtype)
        _, cache = model(tok[:, :16], pos[:, :16], cache)
        steps = []
        for t in range(16, 24):
            logits, cache = model(tok[:, t : t + 1], pos[:, t : t + 1], cache)
            steps.append(logits[:, 0])
        outs[dtype] = np.stack(steps, 1)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(cache))
        print(f"{dtype} cache: {nbytes} bytes")
        if dtype == "int8":
            assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == (*cache.k.shape[:-1], 1)
            # vs a bfloat16 cache of the same shape: values 1 byte instead of 2, plus 4 bytes per token and head
            kv_bf16 = 2 * cache.k.size * 2
            kv_int8 = cache.k.nbytes + cache.v.nbytes + cache.k_scale.nbytes + cache.v_scale.nbytes
            assert kv_int8 <= 0.5 * kv_bf16 * (1 + 4 / GQA6.head_dim)
    np.testing.assert_allclose(outs["float32"], np.asarray(full[:, 16:]), rtol=1e-5, atol=1e-5)
    err = np.abs(outs["int8"] - np.asarray(full[:, 16:])).max() / np.abs(full).max()
    print(f"int8 cache: max |logits - full forward| / max |logits| = {err:.3g}")
    assert err < 0.02


def test_generator_and_chat_with_an_int8_cache(demo):
    from glm4_jax.api import GLM4Chat

    chat = GLM4Chat.from_checkpoint(demo, kv_cache="int8")
    assert chat.generator.new_cache(1, 8).k.dtype == jnp.int8
    streamed = "".join(chat.stream("The quick brown fox", max_new_tokens=8))
    assert streamed == chat.generate("The quick brown fox", max_new_tokens=8).texts[0]  # loop == streaming


@needs_8
def test_int8_kv_cache_on_a_sequence_mesh_and_its_plan():
    from glm4_jax.model import KVCache
    from glm4_jax.placement import init_cache, shard_model
    from glm4_jax.sharding import make_mesh
    from glm4_jax.sharding import plan as planner

    cfg = SHARDABLE
    mesh = make_mesh("sequence=4,tensor=2")
    model = init_model(cfg, 0)
    tok, pos = _tokens(cfg, B=2, T=16)
    ref_cache = KVCache.init(cfg, 2, 32, "int8")
    ref, _ = model(tok, pos, ref_cache)
    sharded = shard_model(init_model(cfg, 0), mesh)
    cache = init_cache(cfg, mesh, 2, 32, "int8")
    assert cache.k_scale.sharding.spec == cache.k.sharding.spec
    step = jax.jit(lambda m, t, p, c: m(t, p, c))
    with jax.set_mesh(mesh):
        out, cache = step(sharded, tok, pos, cache)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    plan = planner.plan_memory(cfg, mesh, batch=2, max_len=32, cache_dtype="int8")
    real = {f"cache/{f}": getattr(cache, f) for f in ("k", "v", "pos", "end", "k_scale", "v_scale")}
    got = {a.name: a.bytes_per_device for a in plan.arrays if a.group == "cache"}
    assert got == {n: x.addressable_shards[0].data.nbytes for n, x in real.items()}
