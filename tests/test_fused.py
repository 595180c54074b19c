"""Fused projections (docs/DESIGN.md, "Fused projections"): q/k/v and gate/up each one matrix of the model, built from
the parts a checkpoint stores; equal to the separate matmuls, and one matmul each in a compiled decode step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import sharpen

from glm4_jax import checkpoint, qmatmul, quant
from glm4_jax.config import FUSED, MODEL_QUANTIZED, QUANTIZED, Config, kv_copies
from glm4_jax.model import KVCache, fuse, fuse_params, init_model, linear, split, split_params
from glm4_jax.paths import flatten
from glm4_jax.placement import param_tree, regroup

# Distinct output widths: q 64, k and v 32 each, qkv 2 * (2 + 2) * 16 = 128 (c = 1); gate and up 80, gate_up 160.
CFG = Config(
    vocab_size=136,
    hidden_size=48,
    intermediate_size=80,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_seq_len=64,
    dtype="float32",
    eos_token_ids=(1,),
    pad_token_id=0,
    group_size=8,  # int4: 6 groups along D = 48, so every quantized matmul loops over at least 2 blocks
)


def _tokens(batch=2, length=9, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, (batch, length)), jnp.int32)


def _positions(batch=2, length=9):
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def test_kv_copies_follow_the_tensor_axis():
    assert [kv_copies(2, t) for t in (1, 2, 4, 8)] == [1, 1, 2, 4]
    assert [kv_copies(4, t) for t in (1, 2, 4, 8, 16)] == [1, 1, 1, 2, 4]
    with pytest.raises(ValueError, match="kv_copies 4 must divide the 2 query heads"):
        CFG.model_layout(4)


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("copies", [1, 2])
def test_model_layout_is_the_stored_layout_fused(scheme, copies):
    """Every fused array is its parts concatenated along the output axes, in the dtype of its parts; the other arrays
    are the stored ones; split undoes fuse exactly (copy 0 of each kv head)."""
    cfg = CFG.replace(quant=scheme)
    stored, model = cfg.stored_layout(), cfg.model_layout(copies)
    assert set(model) - set(stored) == {p for p in FUSED if p in model}
    assert set(stored) - set(model) == {q for p in model if p in FUSED for q in FUSED[p]}
    rng = np.random.RandomState(1)
    flat = {}
    for path, (shape, _, dtype) in stored.items():
        x = rng.randint(0, 200, shape) if dtype in ("int8", "uint8") else rng.randn(*shape)
        flat[path] = jnp.asarray(x, dtype)
    fused = fuse_params(cfg, flat, copies)
    for path, (shape, _, dtype) in model.items():
        assert fused[path].shape == shape and fused[path].dtype == jnp.dtype(dtype), path
    back = split_params(cfg, fused)
    assert list(back) == list(stored)
    for path, x in flat.items():
        np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(x), err_msg=path)
    # every copy of a kv head is that head
    if copies > 1:
        qkv = fused["layers/qkv"]
        g = qkv.shape[-2] - 2
        for j in range(qkv.shape[2]):
            np.testing.assert_array_equal(qkv[:, :, j, g], flat["layers/k"][:, :, j // copies])


@pytest.mark.parametrize("scheme", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("copies", [1, 2])
def test_fused_matmul_equals_the_separate_ones(scheme, copies):
    """One matmul of x by the fused matrix, split, against x by each part on its own (the unfused model's
    matmuls), as the model runs them (`model.linear`; qmatmul.linear for quantized parts).

    float32 and int8: equal to float32 rounding. The products are the same sums over D; only XLA's blocking of
    the dot (and for int8/int4 the number of strided blocks, chosen from the output width) orders them differently.
    bfloat16: both sides accumulate in float32 and round once to bf16, so they differ by at most one bf16 ulp."""
    quantized = scheme in ("int8", "int4")
    cfg = CFG.replace(dtype="float32" if quantized else scheme, quant=scheme if quantized else None)
    rng = np.random.RandomState(2)
    layer = {}
    for path, (shape, _) in cfg.param_layout().items():
        if path.startswith("layers/"):
            layer[path] = rng.randn(*shape[1:]).astype(np.float32) * 0.1
    stored = {}
    for path, w in layer.items():
        if quantized and path in QUANTIZED:
            v, s = quant.quantize(w, tuple(a - 1 for a in QUANTIZED[path]), scheme, cfg.group_size)
            stored[path], stored[path + "_scale"] = jnp.asarray(v), jnp.asarray(s, jnp.float32)
        else:
            stored[path] = jnp.asarray(w, cfg.dtype)
    x = jnp.asarray(rng.randn(3, 5, cfg.hidden_size), cfg.dtype)
    for fused_path in ("layers/qkv", "layers/gate_up"):
        parts = FUSED[fused_path]
        p = {fused_path[7:]: fuse(fused_path, [stored[q] for q in parts], copies)}
        if quantized:
            p[fused_path[7:] + "_scale"] = fuse(fused_path, [stored[q + "_scale"] for q in parts], copies)
        spec = "BTD,DJPH->BTJPH" if fused_path == "layers/qkv" else "BTD,DPF->BTPF"
        got = split(fused_path, linear(cfg, spec, x, p, fused_path[7:]), cfg.num_kv_heads)
        for part, out in zip(parts, got, strict=True):
            if quantized:
                w, s = stored[part], stored[part + "_scale"]
                want = qmatmul.linear(x, w, s, n_in=1, quant=scheme, group=cfg.group_size)
            else:
                want = jnp.einsum("BTD,D...->BT...", x, stored[part])
            assert out.shape == want.shape, part
            a, b = np.asarray(out, np.float32), np.asarray(want, np.float32)
            if scheme == "bfloat16":
                np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6, err_msg=part)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=part)
    assert "layers/q" not in MODEL_QUANTIZED and "layers/qkv" in MODEL_QUANTIZED


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_regrouped_model_gives_the_same_logits(scheme):
    """The same weights with 1 and 2 copies of each kv head (the layout of a tensor=4 mesh here): the model reads
    copy 0 of each, so the logits agree to float32 rounding (the matmuls only grow wider)."""
    cfg = CFG.replace(quant=scheme)
    model = init_model(cfg, seed=3)
    if scheme is None:
        sharpen(model, 10.0)
    tokens, positions = _tokens(), _positions()
    want, _ = model(tokens, positions)
    params = regroup(cfg, param_tree(model), 2)
    assert params["layers"]["qkv"].shape[2] == 4
    graphdef, _ = nnx.split(model)
    wide = nnx.merge(graphdef, params)
    got, _ = wide(tokens, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_checkpoint_keeps_the_parts_and_loads_fused(tmp_path):
    """`save` writes q, k, v, gate and up as before (the stored layout); `load` fuses them on the device, and
    the loaded model gives the saved model's logits exactly."""
    model = sharpen(init_model(CFG, seed=4), 10.0)
    checkpoint.save(tmp_path / "ckpt", model, CFG)
    manifest = checkpoint.check(tmp_path / "ckpt")[1]
    assert {"layers/q", "layers/k", "layers/v", "layers/gate", "layers/up"} <= set(manifest["params"])
    assert not {"layers/qkv", "layers/gate_up"} & set(manifest["params"])
    loaded = checkpoint.load(tmp_path / "ckpt")
    for path, x in flatten(param_tree(model)):
        np.testing.assert_array_equal(np.asarray(dict(flatten(param_tree(loaded)))[path]), np.asarray(x), path)
    assert checkpoint.fusing_order(CFG).index("layers/up") == checkpoint.fusing_order(CFG).index("layers/gate") + 1


def test_load_fuses_the_largest_array_first(tmp_path, monkeypatch):
    """Both load paths (stored arrays, and quantized while loading) hand the fuser gate and up first (gate_up is
    the largest fused array), so its parts are on the devices while little else is: the load's peak stays near
    the model's bytes instead of the model plus gate and up."""
    checkpoint.save(tmp_path / "ckpt", init_model(CFG, seed=4), CFG)
    seen, real = {}, checkpoint._fused

    def spy(arrays, cfg, copies, shardings):
        names = []

        def recorded():
            for name, array in arrays:
                names.append(name)
                yield name, array

        out = real(recorded(), cfg, copies, shardings)
        seen[cfg.quant] = names
        return out

    monkeypatch.setattr(checkpoint, "_fused", spy)
    checkpoint.load(tmp_path / "ckpt")
    checkpoint.load(tmp_path / "ckpt", quantize="int8")
    assert seen[None][:5] == ["layers/gate", "layers/up", "layers/q", "layers/k", "layers/v"]
    assert seen["int8"][:4] == ["layers/gate", "layers/gate_scale", "layers/up", "layers/up_scale"]
    assert sorted(seen[None]) == sorted(CFG.stored_layout())


# ---- the compiled decode step -----------------------------------------------------------------------------------


def _computations(hlo: str) -> dict[str, str]:
    """{name: body text} of the computations of an HLO module's text."""
    comps, name, lines = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name, lines = head.group(1), []
        elif line.startswith("}") and name is not None:
            comps[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return comps


def _called(comps: dict[str, str], name: str) -> set[str]:
    """`name` and every computation it calls, transitively."""
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n in seen or n not in comps:
            continue
        seen.add(n)
        for m in re.finditer(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", comps[n]):
            todo.append(m.group(1))
    return seen


MATMUL = re.compile(r"= \w+\[([\d,]*)\]\S* (?:dot|convolution)\(")


def _layer_body(cfg: Config) -> tuple[dict[str, str], str]:
    """The computations of a compiled one-token decode step of a model of `cfg`, and the name of its layer loop's
    body: of the while loops of the entry computation (the scan over the layers; with quantized weights also the
    block loop of lm_head), the one that calls the most computations."""
    model = init_model(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, tokens, positions, cache):
        return nnx.merge(graphdef, params, rest)(tokens, positions, cache)

    cache = KVCache.init(cfg, 1, 32)
    one = jnp.zeros((1, 1), jnp.int32)
    hlo = jax.jit(step).lower(params, one, one, cache).compile().as_text()
    comps = _computations(hlo)
    entry = next(n for n in comps if re.search(rf"^ENTRY %?{re.escape(n)} ", hlo, re.M))
    bodies = re.findall(r" while\(.*body=%?([\w.\-]+)", comps[entry])
    return comps, max(bodies, key=lambda b: len(_called(comps, b)))


def _matmul_widths(text: str) -> list[int]:
    """The output widths (all dims but the first, multiplied) of the matmuls by a weight in HLO text: the dot and
    convolution ops without batch dims (attention's products, batched over the kv heads, are left out)."""
    widths = []
    for line in text.splitlines():
        m = MATMUL.search(line)
        if m is None or "lhs_batch_dims" in line:
            continue
        dims = [int(d) for d in m.group(1).split(",") if d]
        widths.append(int(np.prod(dims[1:])) if len(dims) > 1 else 1)
    return widths


def test_decode_step_runs_one_matmul_for_qkv_and_one_for_gate_up():
    """bf16: the compiled layer body of a decode step holds exactly four matmuls, one per matrix of the layer:
    qkv (output 2 kv groups x (2 + 2) x 16 = 128 wide), o (48), gate_up (2 x 80 = 160) and down (48); none as
    wide as q (64), k or v (32), gate or up (80) alone."""
    cfg = CFG.replace(dtype="bfloat16")
    comps, body = _layer_body(cfg)
    widths = sorted(w for n in _called(comps, body) for w in _matmul_widths(comps[n]))
    assert widths == [48, 48, 128, 160], widths


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_decode_step_runs_one_block_loop_per_fused_matrix(scheme):
    """int8 / int4: each quantized matmul is a loop over strided blocks of its matrix (qmatmul.linear), with one
    dot per block (two for int4: its low and high nibbles). The layer body holds four such loops, one per matrix
    (qkv, o, gate_up, down; seven without the fusion), and every dot in it is one of those four matrices' (output
    width 128, 48, 160 or 48)."""
    cfg = CFG.replace(dtype="bfloat16", quant=scheme)
    comps, body = _layer_body(cfg)
    loops = re.findall(r" while\(.*body=%?([\w.\-]+)", comps[body])
    assert len(loops) == 4, loops
    per_loop = [sorted(set(w for n in _called(comps, loop) for w in _matmul_widths(comps[n]))) for loop in loops]
    assert sorted(per_loop) == [[48], [48], [128], [160]], per_loop
    outside = _matmul_widths(comps[body])
    assert outside == [], outside
