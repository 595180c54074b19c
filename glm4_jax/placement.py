"""A GLM-4 model on a device mesh: the shardings of its parameters and KV cache, placing it, a sharded forward pass.

The rules themselves (`glm4_jax.sharding`) know logical axis names only; this module applies them to the model's
parameter tree and cache. Everything here is importable from the top-level package too:

    import glm4_jax
    mesh = glm4_jax.sharding.make_mesh("tensor=4,sequence=2")
    glm4_jax.shard_model(model, mesh)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from glm4_jax.config import Config, kv_copies
from glm4_jax.model import (
    GLM4,
    KVCache,
    abstract_model,
    fuse_params,
    init_model,
    kv_copies_of,
    param_axes,
    split_params,
)
from glm4_jax.paths import flatten, map_with_path, unflatten
from glm4_jax.sharding.rules import LOGITS_AXES, TOKENS_AXES, Rules, named_sharding


def param_tree(model: GLM4) -> dict:
    """`nnx.to_pure_dict(nnx.state(model, nnx.Param))`: arrays, or ShapeDtypeStructs for an abstract model."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_shardings(model: GLM4, mesh: Mesh | AbstractMesh, rules: Rules | None = None) -> dict:
    """A `NamedSharding` for every parameter, as a nested dict matching `param_tree(model)`.

    `model` may be a real model or `abstract_model(cfg)`; `mesh` a `Mesh`, or an `AbstractMesh` for planning.
    Raises `ShardingError` when a big weight cannot be divided (see rules.py).
    """
    axes = dict(flatten(param_axes(model)))
    return map_with_path(lambda path, x: named_sharding(mesh, axes[path], x.shape, rules, path), param_tree(model))


def abstract_cache(cfg: Config, batch: int, max_len: int, dtype=None, *, per_row: bool = False) -> KVCache:
    """`KVCache` of ShapeDtypeStructs, without allocating."""
    return jax.eval_shape(lambda: KVCache.init(cfg, batch, max_len, dtype, per_row=per_row))


def cache_shardings(
    cfg: Config,
    mesh: Mesh | AbstractMesh,
    batch: int,
    max_len: int,
    rules: Rules | None = None,
    dtype=None,
    *,
    per_row: bool = False,
) -> KVCache:
    """A `KVCache` of the `NamedSharding`s of a cache with `batch` rows and `max_len` slots: rows on `data` (and
    `fsdp` when it divides them), slots on `sequence`, kv heads on `tensor` when it divides them. `dtype` "int8"
    adds the shardings of the scales (split like k and v); `per_row`: the cache of the continuous-batching engine
    (`end` [batch])."""
    name = None if dtype is None else jnp.dtype(dtype).name
    layout = cfg.cache_layout(batch, max_len, name, per_row=per_row)
    return KVCache(
        **{f: named_sharding(mesh, axes, shape, rules, f"cache/{f}") for f, (shape, axes, _) in layout.items()}
    )


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_params(model_or_cfg: GLM4 | Config, mesh: Mesh | AbstractMesh, rules: Rules | None = None) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`: the target of a sharded restore."""
    if isinstance(model_or_cfg, Config):
        model = abstract_model(model_or_cfg, mesh_kv_copies(model_or_cfg, mesh))
    else:
        model = model_or_cfg
    return _with_shardings(param_tree(model), param_shardings(model, mesh, rules))


# ---- placing things on the mesh ---------------------------------------------------------------------------------


def mesh_kv_copies(cfg: Config, mesh: Mesh | AbstractMesh) -> int:
    """The copies of each kv head in the fused qkv on this mesh (`glm4_jax.config.kv_copies` of its tensor axis)."""
    return kv_copies(cfg.num_kv_heads, dict(mesh.shape).get("tensor", 1))


def regroup(cfg: Config, params: dict, copies: int) -> dict:
    """A parameter tree (nested dict) with its qkv laid out for `copies` copies of each kv head (traceable)."""
    if kv_copies_of(cfg, params) == copies:
        return params
    return unflatten(fuse_params(cfg, split_params(cfg, dict(flatten(params))), copies).items())


def shard_model(model: GLM4, mesh: Mesh, rules: Rules | None = None) -> GLM4:
    """Moves the parameters of `model` onto `mesh` following the rules, in place (`nnx.update`); returns it. The
    fused qkv is regrouped first when the mesh needs another number of kv copies (`mesh_kv_copies`).

    The model must fit in one place first. For a checkpoint use `glm4_jax.load(path, mesh=mesh)`, for random
    weights `init_sharded_model`: neither ever holds a full copy.
    """
    copies = mesh_kv_copies(model.cfg, mesh)
    target = param_shardings(abstract_model(model.cfg, copies), mesh, rules)
    params = jax.jit(lambda p: regroup(model.cfg, p, copies), out_shardings=target)(param_tree(model))
    nnx.update(model, params)
    return model


def init_sharded_model(cfg: Config, mesh: Mesh, seed: int = 0, rules: Rules | None = None) -> GLM4:
    """`init_model(cfg, seed)` with every parameter created directly in its shards (the same weights, the qkv
    regrouped for the mesh)."""
    copies = mesh_kv_copies(cfg, mesh)
    abstract = abstract_model(cfg, copies)
    shardings = param_shardings(abstract, mesh, rules)
    params = jax.jit(lambda: regroup(cfg, param_tree(init_model(cfg, seed)), copies), out_shardings=shardings)()
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, params)


# Random weights, block by block: a [L, D, F] normal made in one program needs its float32 draw (2x the bf16
# bytes) and the cast next to it, and the whole tree at once about 6x the weight bytes. Here each array is filled in
# place by a loop over blocks of at most this many float32 bytes, so the peak is the weights plus one block.
# 32 MiB: with the fused gate_up (one [L, D, 2, F] array), 64 MiB blocks grew a 2-layer full-width bf16 model's
# process by 1.609 GB for 1.084 GB of weights (the test's bound: 1.601 GB); 32 MiB blocks by 1.408 GB.
RANDOM_BLOCK_BYTES = 32 << 20


def _block_plan(shape: tuple[int, ...], max_bytes: int) -> tuple[int, tuple[int, ...]]:
    """(j, block): the array is filled by a loop over the blocks of its first j axes; the block is 1 on the axes
    before j-1, a divisor of shape[j-1] on axis j-1 and whole after it, with at most `max_bytes` of float32.
    j = 0: the whole array is one block."""
    j = next(k for k in range(len(shape) + 1) if 4 * math.prod(shape[k:]) <= max_bytes)
    if j == 0:
        return 0, tuple(shape)
    rest, n = math.prod(shape[j:]), shape[j - 1]
    rows = max(r for r in range(1, n + 1) if n % r == 0 and 4 * r * rest <= max_bytes)
    return j, (1,) * (j - 1) + (rows, *shape[j:])


@functools.cache
def _random_filler(specs: tuple, shardings: tuple, max_bytes: int):
    """A jitted `fill(keys) -> arrays` for `specs`, a tuple of (shape, dtype, kind): kind "normal" (std 0.02),
    "ones", "int8" / "uint8" (uniform over the type) or "scale:<value>" (a constant). An array of more than
    `max_bytes` of float32 is filled in place block by block (see RANDOM_BLOCK_BYTES); small ones come whole."""

    def one(shape, dtype, kind, key):
        dt = jnp.dtype(dtype)

        def draw(key, block):
            if kind == "normal":
                return (0.02 * jax.random.normal(key, block, jnp.float32)).astype(dt)
            lo, hi = (-127, 128) if kind == "int8" else (0, 256)
            return jax.random.randint(key, block, lo, hi, jnp.int32).astype(dt)

        if kind == "ones":
            return jnp.ones(shape, dt)
        if kind.startswith("scale:"):
            return jnp.full(shape, float(kind[6:]), dt)
        j, block = _block_plan(shape, max_bytes)
        if j == 0:
            return draw(key, shape)
        counts = tuple(n // b for n, b in zip(shape[:j], block[:j], strict=True))

        def body(i, out):
            index = jnp.unravel_index(i, counts)
            starts = [index[a] * block[a] for a in range(j)] + [0] * (len(shape) - j)
            return jax.lax.dynamic_update_slice(out, draw(jax.random.fold_in(key, i), block), starts)

        return jax.lax.fori_loop(0, math.prod(counts), body, jnp.zeros(shape, dt))

    def fill(keys):
        return tuple(one(*spec, key) for spec, key in zip(specs, keys, strict=True))

    return jax.jit(fill, out_shardings=shardings)


def _random_kind(cfg: Config, path: str, dtype: str) -> str:
    if path.endswith("norm"):
        return "ones"
    if dtype in ("int8", "uint8"):
        return dtype
    if path.endswith("_scale"):  # scales that give the random integers a std of about 0.02, as model._param
        return f"scale:{0.02 / (73.0 if cfg.quant == 'int8' else 4.3)}"
    return "normal"


def _random_groups(cfg: Config, max_bytes: int, copies: int = 1) -> list[list[tuple[int, str, tuple, str, str]]]:
    """The arrays of `cfg.model_layout(copies)` as (index, path, shape, dtype, kind), grouped into programs: an
    array larger than one block alone, small ones together up to one block of float32."""
    groups, small, small_bytes = [], [], 0
    for n, (path, (shape, _, dtype)) in enumerate(cfg.model_layout(copies).items()):
        item = (n, path, tuple(shape), dtype, _random_kind(cfg, path, dtype))
        size = 4 * math.prod(shape)
        if size > max_bytes:
            groups.append([item])
            continue
        if small and small_bytes + size > max_bytes:
            groups.append(small)
            small, small_bytes = [], 0
        small.append(item)
        small_bytes += size
    return groups + ([small] if small else [])


def random_model(
    cfg: Config,
    mesh: Mesh | None = None,
    seed: int = 0,
    rules: Rules | None = None,
    *,
    block_bytes: int = RANDOM_BLOCK_BYTES,
) -> GLM4:
    """A GLM4 with random weights made where they live, in their stored dtype (`cfg.model_layout()`: bf16, or the
    int8 / int4 values and scales of `cfg.quant`), one large array at a time and each block by block, so that the
    peak memory is the weights plus a few blocks of `block_bytes` (the benchmarks' full-size random models).

    Same distributions as `init_model` (normal std 0.02, norms 1, uniform integers with scales giving std ~0.02),
    not the same values. `mesh` None: the first device. Each array is created directly in its shards, the fused
    ones too: the kv copies of a qkv regrouped for a tensor axis (`mesh_kv_copies`) are drawn apart, and the model
    reads copy 0 of each kv head (`glm4_jax.model.split`), so its output is well defined all the same.
    """
    from glm4_jax.sharding import make_mesh

    mesh = mesh if mesh is not None else make_mesh(None, devices=jax.devices()[:1])
    copies = mesh_kv_copies(cfg, mesh)
    abstract = abstract_model(cfg, copies)
    shardings = dict(flatten(param_shardings(abstract, mesh, rules)))
    key = jax.random.key(seed)
    params = {}
    for group in _random_groups(cfg, block_bytes, copies):
        specs = tuple((shape, dtype, kind) for _, _, shape, dtype, kind in group)
        fill = _random_filler(specs, tuple(shardings[item[1]] for item in group), block_bytes)
        arrays = fill(tuple(jax.random.fold_in(key, item[0]) for item in group))
        jax.block_until_ready(arrays)  # one program at a time
        params |= {item[1]: x for item, x in zip(group, arrays, strict=True)}
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, unflatten(params.items()))


def random_model_memory(cfg: Config, *, block_bytes: int = RANDOM_BLOCK_BYTES) -> dict:
    """What `random_model(cfg)` holds on one device, from its compiled programs, without running them: {"weights":
    bytes of all arrays, "peak": the most held at once (the arrays made so far plus the running program's outputs
    and scratch), "max_temp": the largest scratch}. Compiles one program per distinct group of arrays."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    done = peak = max_temp = 0
    for group in _random_groups(cfg, block_bytes):
        specs = tuple((shape, dtype, kind) for _, _, shape, dtype, kind in group)
        fill = _random_filler(specs, (sharding,) * len(group), block_bytes)
        stats = fill.lower(tuple(jax.random.key(0) for _ in group)).compile().memory_analysis()
        out = sum(math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype, _ in specs)
        temp = stats.temp_size_in_bytes if stats is not None else 0
        peak = max(peak, done + out + temp)
        max_temp = max(max_temp, temp)
        done += out
    return {"weights": done, "peak": peak, "max_temp": max_temp}


def init_cache(
    cfg: Config,
    mesh: Mesh,
    batch: int,
    max_len: int,
    dtype=None,
    rules: Rules | None = None,
    *,
    per_row: bool = False,
) -> KVCache:
    """An empty `KVCache`, created directly in its shards."""
    shardings = cache_shardings(cfg, mesh, batch, max_len, rules, dtype, per_row=per_row)
    init = functools.partial(KVCache.init, cfg, batch, max_len, dtype, per_row=per_row)
    return jax.jit(init, out_shardings=shardings)()


def jit_forward(
    model: GLM4,
    mesh: Mesh,
    *,
    batch: int,
    max_len: int | None = None,
    logits: str = "all",
    rules: Rules | None = None,
):
    """The model's forward pass, jitted with the in/out shardings of the rules, traced and run under
    `jax.set_mesh(mesh)` (so `constrain` and mesh-aware attention kernels see the mesh).

    Args:
      model: a real or abstract GLM4: only its structure is used; the weights come in as an argument.
      mesh: the device mesh.
      batch: rows per call (must be divisible by `data`).
      max_len: None for a cacheless forward; else the slots of the KV cache the function takes and returns.
      logits: "all" or "last" (see `GLM4.__call__`).
    Returns:
      without max_len, `forward(params, tokens, positions) -> logits`;
      with max_len, `forward(params, tokens, positions, cache) -> (logits, cache)` with the cache donated.
      `params` is `param_tree(model)` of a model placed by `shard_model` (or a restored tree); tokens and positions
      [B, T] int; logits [B, T or 1, V] float32, split by batch and vocab. `forward.lower(...)` lowers it.
    """
    cfg = model.cfg
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    p_sh = param_shardings(model, mesh, rules)
    tok_sh = named_sharding(mesh, TOKENS_AXES, (batch, 1), rules, "tokens")
    out_sh = named_sharding(mesh, LOGITS_AXES, (batch, 1, cfg.vocab_size), rules, "logits")

    if max_len is None:

        def forward(params, tokens, positions):
            out, _ = nnx.merge(graphdef, params, rest)(tokens, positions, logits=logits)
            return out

        jitted = jax.jit(forward, in_shardings=(p_sh, tok_sh, tok_sh), out_shardings=out_sh)
    else:
        c_sh = cache_shardings(cfg, mesh, batch, max_len, rules)

        def forward(params, tokens, positions, cache):
            return nnx.merge(graphdef, params, rest)(tokens, positions, cache, logits=logits)

        jitted = jax.jit(
            forward,
            in_shardings=(p_sh, tok_sh, tok_sh, c_sh),
            out_shardings=(out_sh, c_sh),
            donate_argnames=("cache",),
        )

    @functools.wraps(forward)
    def run(params, tokens, positions, *cache):
        tokens, positions = global_input(tokens, tok_sh), global_input(positions, tok_sh)
        with jax.set_mesh(mesh):
            return jitted(params, tokens, positions, *cache)

    def lower(*args):
        with jax.set_mesh(mesh):
            return jitted.lower(*args)

    run.lower = lower
    run.jitted = jitted
    return run


def global_input(x, sharding: NamedSharding):
    """A host value every process holds in full (tokens, positions) as a global array with `sharding`.

    One process: x unchanged (jit places it). Several: `jax.make_array_from_callback`, each process filling its
    own devices' shards from its copy, since jit cannot take a host array for devices of other processes.
    """
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
