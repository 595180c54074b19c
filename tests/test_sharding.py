"""Meshes, sharding rules and the memory planner on 8 fake CPU devices (tests/conftest.py).

The backbone: a tiny GLM-4 sharded five ways gives the logits and greedy tokens of the single-device run, every
parameter lands where the rules table says, and the planner's bytes are the real per-device buffer sizes.
"""

from __future__ import annotations

import json
import math
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from glm4_jax.config import preset
from glm4_jax.fixtures import SHARDABLE
from glm4_jax.model import KVCache, init_model, param_axes
from glm4_jax.placement import (
    abstract_params,
    cache_shardings,
    init_cache,
    init_sharded_model,
    jit_forward,
    param_shardings,
    param_tree,
    shard_model,
)
from glm4_jax.sharding import (
    RULES,
    ShardingError,
    abstract_mesh,
    constrain,
    initialize_distributed,
    logical_to_spec,
    make_mesh,
    parse_mesh_spec,
    tpu_vm_host_count,
)
from glm4_jax.sharding import plan as planner

CFG = SHARDABLE
B, T, MAX_LEN, STEPS = 2, 8, 16, 4
TOL = dict(rtol=1e-5, atol=1e-5)

MESHES = [
    "tensor=8",
    "fsdp=8",
    "data=2,fsdp=2,tensor=2",
    "sequence=4,tensor=2",
    "data=2,sequence=4",
]

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _inputs():
    tokens = jax.random.randint(jax.random.key(1), (B, T), 2, CFG.vocab_size, dtype=jnp.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    positions[1] = np.arange(T) - 3  # row 1 is left-padded by 3 tokens
    tokens = jnp.where(positions >= 0, tokens, CFG.pad_token_id)
    return tokens, jnp.asarray(positions)


def _decode(step_fn, tokens, positions, cache):
    """Prefill then STEPS greedy steps; returns the logits of every call and the chosen ids."""
    logits, cache = step_fn(tokens, positions, cache)
    all_logits, ids = [logits], []
    pos = positions[:, -1:]
    for _ in range(STEPS):
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        ids.append(np.asarray(nxt))
        pos = pos + 1
        logits, cache = step_fn(nxt, pos, cache)
        all_logits.append(logits)
    return [np.asarray(x) for x in all_logits], np.concatenate(ids, axis=1)


@pytest.fixture(scope="module")
def reference():
    """The single-device run: plain forward and cached greedy decode."""
    model = init_model(CFG, seed=0)
    model.attention_impl = "dense"
    tokens, positions = _inputs()
    plain, _ = model(tokens, positions)
    step = jax.jit(lambda t, p, c: model(t, p, c, logits="last"))
    decoded = _decode(step, tokens, positions, KVCache.init(CFG, B, MAX_LEN))
    return np.asarray(plain), decoded


# ---- mesh spec ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, n, want",
    [
        ("data=1,fsdp=2,tensor=4,sequence=1", 8, dict(data=1, fsdp=2, sequence=1, tensor=4)),
        ("tensor=8", 8, dict(data=1, fsdp=1, sequence=1, tensor=8)),
        (" sequence = 4 , tensor=-1 ", 8, dict(data=1, fsdp=1, sequence=4, tensor=2)),
        ({"data": 2, "fsdp": -1}, 16, dict(data=2, fsdp=8, sequence=1, tensor=1)),
        ("", 1, dict(data=1, fsdp=1, sequence=1, tensor=1)),
        (None, None, dict(data=1, fsdp=1, sequence=1, tensor=1)),
        ("sequence=16", None, dict(data=1, fsdp=1, sequence=16, tensor=1)),
    ],
)
def test_parse_mesh_spec(spec, n, want):
    got = parse_mesh_spec(spec, n)
    assert got == want
    assert list(got) == ["data", "fsdp", "sequence", "tensor"]


@pytest.mark.parametrize(
    "spec, n, match",
    [
        ("model=8", 8, "unknown mesh axis 'model'; the axes are data, fsdp, sequence, tensor"),
        ("tensor=4", 8, "has 4 devices but there are 8"),
        ("data=2,tensor=2,sequence=4", 8, "has 16 devices but there are 8"),
        ("data=-1,tensor=-1", 8, "only one axis may be -1"),
        ("tensor=3,data=-1", 8, "do not divide the 8 devices"),
        ("tensor=-1", None, "-1 needs the number of devices"),
        ("tensor=0", 8, "sizes are positive"),
        ("tensor:8", 8, "is not AXIS=SIZE"),
        ("tensor=2,tensor=4", 8, "given twice"),
        ({"tensor": "8"}, 8, "must be an int"),
    ],
)
def test_parse_mesh_spec_errors(spec, n, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh_spec(spec, n)


@needs_8
def test_make_mesh():
    mesh = make_mesh("sequence=2,tensor=-1")
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == dict(data=1, fsdp=1, sequence=2, tensor=4)
    assert mesh.devices.size == 8
    one = make_mesh(None, devices=jax.devices()[:1])
    assert one.devices.size == 1
    with pytest.raises(ValueError, match="has 2 devices but there are 8"):
        make_mesh("tensor=2")


# ---- sharded == single device ---------------------------------------------------------------------------------


@needs_8
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_matches_single_device(spec, reference):
    want_plain, (want_logits, want_ids) = reference
    mesh = make_mesh(spec)
    model = shard_model(init_model(CFG, seed=0), mesh)
    # The equivalence under test is the rules' (GSPMD); mesh-aware kernels ("ring") have their own tests.
    model.attention_impl = "dense"
    params = param_tree(model)
    tokens, positions = _inputs()

    forward = jit_forward(model, mesh, batch=B)
    plain = forward(params, tokens, positions)
    assert plain.sharding.spec == logical_to_spec(("batch", None, "vocab"), plain.shape, mesh)
    np.testing.assert_allclose(np.asarray(plain), want_plain, **TOL)

    step = jit_forward(model, mesh, batch=B, max_len=MAX_LEN, logits="last")
    cache = init_cache(CFG, mesh, B, MAX_LEN)
    got_logits, got_ids = _decode(lambda t, p, c: step(params, t, p, c), tokens, positions, cache)
    np.testing.assert_array_equal(got_ids, want_ids)
    for got, want in zip(got_logits, want_logits, strict=True):
        np.testing.assert_allclose(got, want, **TOL)


# ---- where every parameter lands ------------------------------------------------------------------------------

# Written out by hand from the rules table (docs/SHARDING.md), independently of the resolver.
EXPECTED_SPECS = {
    "tensor=8": {
        "embed": P("tensor", None),
        "lm_head": P(None, "tensor"),
        "final_norm": P(None),
        "layers/attn_norm": P(None, None),
        # 2 kv heads, 4 copies each: 8 kv groups of 1 query head, its k and its v, one group per device
        "layers/qkv": P(None, None, "tensor", None, None),
        "layers/qkv_bias": P(None, "tensor", None, None),
        "layers/o": P(None, "tensor", None, None),
        "layers/gate_up": P(None, None, None, "tensor"),
        "layers/down": P(None, "tensor", None),
        "cache/k": P(None, None, None, None, None),
        "cache/pos": P(None, None),
    },
    "fsdp=8": {
        "embed": P(None, "fsdp"),
        "lm_head": P("fsdp", None),
        "layers/qkv": P(None, "fsdp", None, None, None),
        "layers/o": P(None, None, None, "fsdp"),
        "layers/gate_up": P(None, "fsdp", None, None),
        "layers/down": P(None, None, "fsdp"),
        "layers/mlp_norm": P(None, None),
        "cache/k": P(None, None, None, None, None),  # batch 2 < fsdp 8: replicated
    },
    "data=2,fsdp=2,tensor=2": {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "layers/qkv": P(None, "fsdp", "tensor", None, None),
        "layers/qkv_bias": P(None, "tensor", None, None),
        "layers/o": P(None, "tensor", None, "fsdp"),
        "layers/gate_up": P(None, "fsdp", None, "tensor"),
        "layers/down": P(None, "tensor", "fsdp"),
        "cache/k": P(None, "data", None, "tensor", None),  # batch 2: data, not data x fsdp
        "cache/pos": P("data", None),
    },
    "sequence=4,tensor=2": {
        "embed": P("tensor", None),
        "layers/qkv": P(None, None, "tensor", None, None),
        "cache/k": P(None, None, "sequence", "tensor", None),
        "cache/v": P(None, None, "sequence", "tensor", None),
        "cache/pos": P(None, "sequence"),
        "cache/end": P(),
    },
    "data=2,sequence=4": {
        "embed": P(None, None),
        "layers/qkv": P(None, None, None, None, None),
        "cache/k": P(None, "data", "sequence", None, None),
        "cache/pos": P("data", "sequence"),
    },
}

BIG_AXES = {"vocab", "embed", "q_heads", "kv_groups", "ffn"}  # never silently replicated


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _norm(spec, rank):
    return tuple(spec) + (None,) * (rank - len(spec))


@needs_8
@pytest.mark.parametrize("spec", MESHES)
def test_parameter_and_cache_placement(spec):
    mesh = make_mesh(spec)
    sizes = dict(mesh.shape)
    model = shard_model(init_model(CFG, seed=0), mesh)
    arrays = dict(_flat(param_tree(model)))
    axes = dict(_flat(param_axes(model)))
    cache = init_cache(CFG, mesh, B, MAX_LEN)
    for field, logical in KVCache.AXES.items():
        arrays[f"cache/{field}"] = getattr(cache, field)
        axes[f"cache/{field}"] = logical

    for name, want in EXPECTED_SPECS[spec].items():
        got = arrays[name].sharding.spec
        assert _norm(got, arrays[name].ndim) == _norm(want, arrays[name].ndim), name

    for name, x in arrays.items():
        # Every device holds the shard the sharding describes.
        shard = x.sharding.shard_shape(x.shape)
        assert {s.data.shape for s in x.addressable_shards} == {shard}, name
        spec = _norm(x.sharding.spec, x.ndim)
        for dim, size, entry, logical in zip(x.shape, shard, spec, axes[name], strict=True):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            if logical is None:  # the parts of a fused matrix: never split
                assert names == (), name
                continue
            # A dim is split only over mesh axes its rule names, and exactly by their product.
            assert set(names) <= {r.rstrip("?") for r in RULES[logical]}, (name, logical, names)
            assert size * math.prod(sizes[a] for a in names) == dim, (name, logical)
            # Big weights are split over every mesh axis of their rule (no silent replication).
            if logical in BIG_AXES:
                assert set(names) == {a for a in RULES[logical] if sizes[a] > 1}, (name, logical)


@needs_8
def test_init_sharded_model_matches_init_model():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    sharded = init_sharded_model(CFG, mesh, seed=3)
    plain = init_model(CFG, seed=3)
    want = dict(_flat(param_tree(plain)))
    shardings = dict(_flat(param_shardings(plain, mesh)))
    for name, x in _flat(param_tree(sharded)):
        assert x.sharding == shardings[name], name
        # Same random draws; jit may round the normal sampler's float32 math differently in the last bit.
        np.testing.assert_allclose(np.asarray(x), np.asarray(want[name]), rtol=1e-6, atol=1e-9)


def test_abstract_params_and_cache_shardings():
    mesh = abstract_mesh("tensor=2,sequence=4")
    tree = abstract_params(CFG, mesh)
    qkv = tree["layers"]["qkv"]  # tensor=2 divides the 2 kv heads: one copy each, 4 query heads per group
    assert isinstance(qkv, jax.ShapeDtypeStruct) and qkv.shape == (2, 64, 2, 6, 16)
    assert qkv.sharding.spec == P(None, None, "tensor", None, None)
    cache = cache_shardings(CFG, mesh, batch=1, max_len=32)
    assert isinstance(cache, KVCache)
    assert cache.k.spec == P(None, None, "sequence", "tensor", None)
    assert cache.k.shard_shape((2, 1, 32, 2, 16)) == (2, 1, 8, 1, 16)


# ---- errors -----------------------------------------------------------------------------------------------------


def test_indivisible_shapes_name_axis_and_sizes():
    mesh = abstract_mesh("tensor=8")
    with pytest.raises(ShardingError, match=r"^tensor=8 does not divide q_heads=4 of layers/q \[L, D, N, H\]"):
        logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (2, 64, 4, 16), mesh, name="layers/q")
    few_heads = CFG.replace(num_heads=4)
    with pytest.raises(ShardingError, match=r"tensor=8 does not divide q_heads=4 of layers/(o|q) \["):
        param_shardings(nnx.eval_shape(lambda: init_model(few_heads)), mesh)
    with pytest.raises(ShardingError, match=r"tensor=8 does not divide ffn=100 of layers/down \[L, F, D\]"):
        abstract_params(CFG.replace(intermediate_size=100), mesh)
    with pytest.raises(ShardingError, match=r"tensor=8 does not divide vocab=260 of embed \[V, D\]"):
        abstract_params(CFG.replace(vocab_size=260), mesh)
    with pytest.raises(ShardingError, match=r"fsdp=8 does not divide embed=60 of embed \[V, D\]"):
        abstract_params(CFG.replace(hidden_size=60), abstract_mesh("fsdp=8"))
    with pytest.raises(ShardingError, match=r"data=2 does not divide batch=1 of cache/k \[L, B, S, K, H\]"):
        cache_shardings(CFG, abstract_mesh("data=2,tensor=4"), batch=1, max_len=16)
    with pytest.raises(ShardingError, match=r"sequence=4 does not divide cache_seq=10 of cache/k"):
        cache_shardings(CFG, abstract_mesh("sequence=4"), batch=1, max_len=10)
    # Small or per-request dims replicate instead: kv heads over tensor, the batch over fsdp.
    assert logical_to_spec(("batch", "kv_heads"), (1, 2), abstract_mesh("fsdp=4,tensor=8")) == P(None, None)


def test_rules_table_checks():
    mesh = abstract_mesh("fsdp=2,tensor=4")
    two_on_fsdp = {**RULES, "ffn": ("fsdp",)}
    with pytest.raises(ShardingError, match=r"mesh axis 'fsdp' would shard two dims \(embed and ffn\) of layers/up"):
        logical_to_spec(("layers", "embed", "ffn"), (2, 64, 128), mesh, two_on_fsdp, "layers/up")
    # Checked from the table alone, even where the mesh axis has size 1.
    with pytest.raises(ShardingError, match="would shard two dims"):
        logical_to_spec(("layers", "embed", "ffn"), (2, 64, 128), abstract_mesh(None), two_on_fsdp)
    with pytest.raises(ShardingError, match="no sharding rule for logical axis 'experts'"):
        logical_to_spec(("experts",), (8,), mesh)
    with pytest.raises(ShardingError, match="names 'model', which is not a mesh axis"):
        logical_to_spec(("ffn",), (128,), mesh, {**RULES, "ffn": ("model",)})


# ---- planner ----------------------------------------------------------------------------------------------------


@needs_8
@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "tensor=8", "sequence=4,tensor=2"])
def test_planner_matches_real_buffers(spec):
    mesh = make_mesh(spec)
    plan = planner.plan_memory(CFG, mesh, batch=B, max_len=MAX_LEN)
    model = shard_model(init_model(CFG, seed=0), mesh)
    cache = init_cache(CFG, mesh, B, MAX_LEN)
    real = dict(_flat(param_tree(model)))
    real.update({f"cache/{f}": getattr(cache, f) for f in KVCache.AXES})
    assert {a.name for a in plan.arrays} == set(real)
    for a in plan.arrays:
        x = real[a.name]
        assert {s.data.nbytes for s in x.addressable_shards} == {a.bytes_per_device}, a.name
        assert a.global_bytes == x.nbytes
    per_device = {d: 0 for d in mesh.devices.flat}
    for x in real.values():
        for s in x.addressable_shards:
            per_device[s.device] += s.data.nbytes
    assert set(per_device.values()) == {plan.total_bytes}
    # The same plan from a spec string (AbstractMesh, no devices).
    assert planner.plan_memory(CFG, spec, batch=B, max_len=MAX_LEN).total_bytes == plan.total_bytes


def test_planner_full_size_presets():
    cfg = preset("glm-4-9b-chat-1m")
    n_params = (
        2 * cfg.vocab_size * cfg.hidden_size
        + cfg.hidden_size
        + cfg.num_layers
        * (
            2 * cfg.hidden_size
            + cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            + cfg.num_heads * cfg.head_dim * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.intermediate_size
        )
    )
    kv = 2 * cfg.num_layers * (1 << 20) * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16
    for seq in (8, 16):
        plan = planner.plan_memory(cfg, f"sequence={seq}", batch=1, max_len=1 << 20, device="h100")
        assert plan.weights_bytes == 2 * n_params  # replicated over sequence
        assert plan.cache_bytes == kv // seq + 4 * (1 << 20) // seq + 4
        assert plan.fits
    split = planner.plan_memory(cfg, "tensor=2,sequence=8", batch=1, max_len=1 << 20, device="v5e")
    assert split.n_devices == 16 and split.cache_bytes < kv // 16 + (1 << 20)
    assert not planner.plan_memory(cfg, "sequence=8", batch=1, max_len=1 << 20, device="v5e").fits
    # glm-4-9b-chat (2 kv heads) on tensor=8: the kv heads replicate, and the plan says what it costs.
    chat = planner.plan_memory(preset("glm-4-9b-chat"), "tensor=8", batch=1, max_len=131072, device="v5e")
    assert any("kv_heads=2 cannot be divided by tensor=8" in n for n in chat.notes)


def test_planner_prefill_activations():
    """With a prefill chunk the plan adds its activations per device: on sequence=8 the hidden states and the MLP
    are split along T, so a ring prefill of the whole context needs an eighth of one device's."""
    cfg = preset("glm-4-9b-chat-1m")
    T = 1 << 20
    one = planner.activation_bytes(cfg, {}, 1, T, ring=False)
    mlp = 2 * T * cfg.hidden_size * 2 + T * cfg.hidden_size * 2 + 3 * T * cfg.intermediate_size * 2  # the MLP phase
    assert one == mlp
    for seq in (8, 16):
        plan = planner.plan_memory(cfg, f"sequence={seq}", batch=1, max_len=T, prefill_chunk=T)
        assert plan.activation_bytes == one // seq
        assert plan.total_bytes == plan.weights_bytes + plan.cache_bytes + plan.activation_bytes
    # a chunk against a sequence-sharded cache: the queries and their softmax state are whole on every device
    chunked = planner.plan_memory(cfg, "sequence=8", batch=1, max_len=T, prefill_chunk=T // 2)
    assert chunked.activation_bytes > planner.activation_bytes(cfg, {"sequence": 8}, 1, T // 2, ring=True)
    assert planner.plan_memory(cfg, "sequence=8", batch=1, max_len=T).activation_bytes == 0
    with pytest.raises(ValueError, match="prefill_chunk"):
        planner.plan_memory(cfg, "sequence=8", batch=1, max_len=T, prefill_chunk=0)


def test_planner_cli(capsys):
    argv = ["--preset", "glm-4-9b-chat-1m", "--mesh", "sequence=8", "--batch", "1", "--max-len", "1048576"]
    assert planner.main([*argv, "--device", "h100"]) == 0
    text = capsys.readouterr().out
    assert "cache/k" in text and "(-, -, sequence, -, -)" in text and "FITS" in text

    assert planner.main([*argv, "--device", "h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mesh"] == dict(data=1, fsdp=1, sequence=8, tensor=1)
    assert plan["fits"] is True
    k = next(a for a in plan["arrays"] if a["name"] == "cache/k")
    assert k["spec"] == [None, None, "sequence", None, None] and k["bytes_per_device"] == 5 << 30

    assert planner.main(["--preset", "glm-4-9b-chat", "--mesh", "tensor=3"]) == 2
    assert "tensor=3 does not divide" in capsys.readouterr().err
    assert planner.main(["--mesh", "tensor=-1", "--devices", "4", "--device", "v5e", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mesh"]["tensor"] == 4


def test_planner_cli_exit_status_and_wording(capsys):
    # Does not fit: exit status 1, so scripts can test it; one device is "1 device".
    assert planner.main(["--preset", "glm-4-9b-chat", "--max-len", "131072", "--device", "v5e"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "(1 device)" in text and "(1 devices)" not in text
    assert planner.main(["--preset", "glm-4-9b-chat", "--max-len", "131072", "--device", "v5e", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert planner.main(["--preset", "glm-4-9b-chat", "--mesh", "tensor=2", "--device", "h100"]) == 0
    assert "(2 devices)" in capsys.readouterr().out
    assert planner.main(["--preset", "glm-4-9b-chat"]) == 0  # no device: no verdict
    assert planner.main(["--mesh", "tensor=x"]) == 2
    assert capsys.readouterr().err.startswith("error: mesh spec")
    assert planner.main(["--preset", "glm-4-9b-chat", "--prefill-chunk", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --prefill-chunk")
    assert planner.main(["--preset", "glm-4-9b-chat", "--mesh", "sequence=8", "--prefill-chunk", "8192"]) == 0
    assert "+ activations " in capsys.readouterr().out


# ---- multi-host and constraints -------------------------------------------------------------------------------


def test_initialize_distributed_off_tpu(monkeypatch):
    for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed(False) is False
    if tpu_vm_host_count() == 1:  # not on a TPU VM slice: auto mode does nothing
        assert initialize_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")
    assert tpu_vm_host_count() == 4


@needs_8
def test_constrain_follows_the_ambient_mesh():
    x = jnp.ones((4, 8))
    assert constrain(x, ("batch", "vocab")) is x  # no mesh: identity
    mesh = make_mesh("data=2,tensor=4")
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "vocab")))
    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == P("data", "tensor")


@pytest.mark.slow
def test_two_processes_match_single_device():
    """Two JAX processes (4 CPU devices each) joined by jax.distributed: tests/multiprocess_worker.py."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = pathlib.Path(__file__).with_name("multiprocess_worker.py")
    cmd = [sys.executable, str(worker), "--num-processes", "2", "--port", str(port), "--mesh", "data=2,fsdp=2,tensor=2"]
    procs = [
        subprocess.Popen([*cmd, "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK process {i}/2" in out, out[-3000:]
