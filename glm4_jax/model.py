"""The GLM-4 decoder in Flax NNX, readable top to bottom.

Einsum letters:
    B batch, T query length, S key length (cache slots), D model width (hidden_size), N query heads,
    K kv heads, G query heads per kv head (N = K * G), H head dim, F ffn width, V vocabulary, L layers;
    J kv groups of the fused qkv (K * c, with c copies of each kv head), P the parts of a fused matrix.

Every parameter carries its logical axis names in the `axes` metadata of its `nnx.Param`; the sharding rules in
`glm4_jax.sharding` map those names to mesh axes. The layers are stacked along a leading L axis and run under
`jax.lax.scan`, so compile time does not grow with depth.

Positions and padding: each token comes with a position (0 at a sequence's first real token); a negative
position marks padding. A query attends to the keys of its own row whose position is in [0, its own position],
so left-padded batches need no separate mask, and cached decode uses the same rule against the positions
stored in the cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm4_jax import attention, kernels, qmatmul, ring
from glm4_jax.config import CACHE_AXES, CACHE_SCALE_AXES, FUSED, MODEL_QUANTIZED, ROW_CACHE_AXES, Config
from glm4_jax.paths import unflatten
from glm4_jax.sharding.rules import HIDDEN_AXES, constrain

Array = jax.Array

# ---- parameters ---------------------------------------------------------------------------------------------


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _param(cfg: Config, path: str, rngs: nnx.Rngs, init: str = "normal", kv_copies: int = 1) -> nnx.Param:
    """The parameter at `path` of `Config.model_layout` (shape, logical axes, dtype): normal(0.02) or ones; for
    quantized weights (int8 / uint8 int4 pairs) random integers, and scales that give them a std of about 0.02."""
    shape, axes, dtype = cfg.model_layout(kv_copies)[path]
    if dtype in ("int8", "uint8"):
        lo, hi = (-127, 128) if dtype == "int8" else (0, 256)
        value = jax.random.randint(rngs.params(), shape, lo, hi, jnp.int32).astype(dtype)
    elif path.endswith("_scale"):
        value = jnp.full(shape, 0.02 / (73.0 if cfg.quant == "int8" else 4.3), cfg.dtype)
    else:
        dt = jnp.dtype(dtype)
        value = jnp.ones(shape, dt) if init == "ones" else _normal(rngs, shape, dt)
    return nnx.Param(value, axes=axes)


class Layers(nnx.Module):
    """The weights of all decoder layers, stacked along a leading L axis. q, k and v are one matrix, and gate and
    up another (`Config.model_layout`; `fuse` and `split` convert from and to the parts a checkpoint stores)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, kv_copies: int = 1):
        def p(name, init="normal"):
            return _param(cfg, "layers/" + name, rngs, init, kv_copies)

        self.attn_norm = p("attn_norm", "ones")
        self.qkv = p("qkv")  # [L, D, J, G/c + 2, H]: J = K * c kv groups, each G/c query heads, its k and its v
        if cfg.attention_bias:
            self.qkv_bias = p("qkv_bias")  # [L, J, G/c + 2, H]
        self.o = p("o")  # [L, N, H, D]
        if cfg.post_norms:  # GLM-4-0414: RMSNorm on the attention output, before the residual add
            self.post_attn_norm = p("post_attn_norm", "ones")
        self.mlp_norm = p("mlp_norm", "ones")
        self.gate_up = p("gate_up")  # [L, D, 2, F]
        self.down = p("down")  # [L, F, D]
        if cfg.post_norms:  # and on the MLP output
            self.post_mlp_norm = p("post_mlp_norm", "ones")
        # With cfg.quant, the matrices above are stored quantized (int8, or uint8 int4 pairs; Config.stored_layout)
        # and each has its scales.
        if cfg.quant:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(self, f"{name}_scale", p(f"{name}_scale"))


# ---- fused projections ------------------------------------------------------------------------------------------


def fuse(path: str, parts, kv_copies: int = 1) -> Array:
    """The FUSED array at `path` ("layers/qkv", "layers/gate_up", their biases and scales) from its parts, laid out
    as `Config.model_layout(kv_copies)`. Parts and result have the fused axes last: the heads and head dim
    ([..., N, H] and [..., K, H] -> [..., K*c, G/c + 2, H]), or the ffn ([..., F] -> [..., 2, F])."""
    if not path.startswith("layers/qkv"):
        return jnp.stack(parts, axis=-2)
    q, k, v = parts
    K = k.shape[-2]
    c = kv_copies
    q = q.reshape(*q.shape[:-2], K * c, q.shape[-2] // (K * c), q.shape[-1])
    k, v = (jnp.repeat(x, c, axis=-2)[..., None, :] for x in (k, v))  # copy j of kv head h: group h * c + j
    return jnp.concatenate([q, k, v], axis=-2)


def split(path: str, fused: Array, num_kv_heads: int) -> tuple[Array, ...]:
    """The parts of a fused array (weights, or the activations of a fused matmul, laid out alike): the inverse of
    `fuse`, taking copy 0 of each kv head."""
    if not path.startswith("layers/qkv"):
        return fused[..., 0, :], fused[..., 1, :]
    J, g = fused.shape[-3], fused.shape[-2] - 2
    c = J // num_kv_heads
    q = fused[..., :g, :].reshape(*fused.shape[:-3], J * g, fused.shape[-1])
    return q, fused[..., ::c, g, :], fused[..., ::c, g + 1, :]


def kv_copies_of(cfg: Config, params: dict) -> int:
    """The kv copies of a parameter tree (nested dict) of the model."""
    return params["layers"]["qkv"].shape[2] // cfg.num_kv_heads


def fuse_params(cfg: Config, flat: dict, kv_copies: int = 1) -> dict:
    """A flat {path: array} of `cfg.stored_layout()` as one of `cfg.model_layout(kv_copies)` (the parts fused)."""
    out = {}
    for path in cfg.model_layout(kv_copies):
        parts = FUSED.get(path)
        out[path] = flat[path] if parts is None else fuse(path, [flat[p] for p in parts], kv_copies)
    return out


def split_params(cfg: Config, flat: dict) -> dict:
    """A flat {path: array} of the model's layout as one of `cfg.stored_layout()` (the inverse of `fuse_params`)."""
    out = {}
    for path, x in flat.items():
        parts = FUSED.get(path)
        out |= {path: x} if parts is None else dict(zip(parts, split(path, x, cfg.num_kv_heads), strict=True))
    return {path: out[path] for path in cfg.stored_layout()}


# The new keys and values of a layer [B, T, K, H], split like the hidden states and the cache's kv heads.
KV_AXES = (HIDDEN_AXES[0], HIDDEN_AXES[1], "kv_heads", "head_dim")


# ---- KV cache -------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys (already rotated) and values of every layer, plus the position held in each slot.

    In a static batch all rows are written at the same slots (prompts are left-padded), so one `end` [] serves the
    batch. In the continuous-batching engine (glm4_jax.batching) every row is a request of its own and `end` is
    [B]: row b writes at its own slots [end[b], end[b] + T).
    An int8 cache stores k and v as int8 with one float32 scale per token and kv head (k_scale, v_scale
    [L, B, S, K, 1]); the others have no scales (None).
    """

    k: Array  # [L, B, S, K, H]
    v: Array  # [L, B, S, K, H]
    pos: Array  # [B, S] int32: the position of the token in each slot; -1 for empty slots and padding
    end: Array  # [] or [B] int32: the next slot to write (of the batch, or of each row)
    k_scale: Array | None = None  # [L, B, S, K, 1] float32, int8 caches only
    v_scale: Array | None = None

    AXES = CACHE_AXES  # the logical axes of each field (glm4_jax.config); ROW_AXES with a per-row `end`
    ROW_AXES = ROW_CACHE_AXES
    SCALE_AXES = CACHE_SCALE_AXES  # and of the scales of an int8 cache

    @classmethod
    def init(cls, cfg: Config, batch: int, max_len: int, dtype=None, *, per_row: bool = False) -> KVCache:
        """An empty cache: `cfg.cache_layout(batch, max_len, dtype, per_row=)`, k and v in `dtype` (default
        cfg.dtype; "int8" for an int8 cache)."""
        name = None if dtype is None else jnp.dtype(dtype).name
        layout = cfg.cache_layout(batch, max_len, name, per_row=per_row)
        fill = {"pos": -1}
        return cls(**{name: jnp.full(shape, fill.get(name, 0), dt) for name, (shape, _, dt) in layout.items()})

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]


# ---- building blocks ----------------------------------------------------------------------------------------


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm with the variance and the scaling in float32, cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def yarn_inv_freq(cfg: Config) -> np.ndarray:
    """YaRN's frequencies [rotary_dim // 2] (float32), step for step as transformers' `_compute_yarn_parameters`:
    the frequencies that turn fewer than beta_slow times over the original context are interpolated (divided by
    the factor), those that turn more than beta_fast times are kept, with a linear ramp between."""
    dim, base, original = cfg.rotary_dim, cfg.rope_theta, cfg.yarn_original_max_seq_len

    def correction_dim(rotations):  # the dim index whose wavelength turns `rotations` times over the context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.yarn_beta_fast), correction_dim(cfg.yarn_beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)  # 1: keep the frequency, 0: interpolate it
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(cfg.yarn_factor) * pos_freqs)
    return (inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation).astype(np.float32)


def rope_tables(positions: Array, cfg: Config) -> tuple[Array, Array]:
    """cos and sin, [B, T, rotary_dim // 2] in float32, for positions [B, T]. With YaRN, its frequencies, and
    cos and sin scaled by its attention factor (so q.k by its square), as transformers does."""
    half = cfg.rotary_dim // 2
    if cfg.rope_type == "yarn":
        inv_freq = jnp.asarray(yarn_inv_freq(cfg))
    else:
        inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    if cfg.rope_type == "yarn":
        scale = jnp.float32(cfg.yarn_attention_factor)
        return jnp.cos(angles) * scale, jnp.sin(angles) * scale
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates adjacent pairs (0,1), (2,3), ... of the first rotary_dim dims of each head of x [B, T, *, H]."""
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].astype(jnp.float32).reshape(*x.shape[:-1], rot // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]  # [B, T, *, rot/2]
    c = cos[:, :, None, :]  # broadcast over heads
    s = sin[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1).reshape(*x.shape[:-1], rot)
    return jnp.concatenate([out.astype(x.dtype), x[..., rot:]], axis=-1)


# ---- the model ------------------------------------------------------------------------------------------------


class GLM4(nnx.Module):
    """GLM-4 causal language model: embedding, `num_layers` pre-norm decoder layers, final norm, output layer."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, attention_impl: str = "auto", kv_copies: int = 1):
        self.cfg = cfg
        # Static choice of attention kernel (see glm4_jax.attention.IMPLEMENTATIONS); may be set after construction.
        self.attention_impl = attention_impl
        self.embed = _param(cfg, "embed", rngs)  # [V, D]
        self.layers = Layers(cfg, rngs=rngs, kv_copies=kv_copies)
        self.final_norm = _param(cfg, "final_norm", rngs, "ones")  # [D]
        self.lm_head = _param(cfg, "lm_head", rngs)  # [D, V]
        if cfg.quant:
            self.lm_head_scale = _param(cfg, "lm_head_scale", rngs)

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: KVCache | None = None,
        *,
        logits: Literal["all", "last"] = "all",
    ) -> tuple[Array, KVCache | None]:
        """Runs the model on a block of tokens, appending to the cache when one is given.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int positions; negative for (left) padding.
          cache: the KV cache to append to at slots [cache.end, cache.end + T) (per row when `end` is [B]), or None
            for a plain forward pass.
          logits: "all" for every position, "last" for the last position only (prefill before sampling).
        Returns:
          (logits [B, T or 1, V] in float32, the updated cache or None).
        """
        cfg, impl = self.cfg, self.attention_impl
        positions = positions.astype(jnp.int32)
        T = tokens.shape[1]
        # Context parallelism (docs/LONG_CONTEXT.md): on a `sequence` mesh the hidden states are split along T from
        # the embedding to the final norm. A cacheless ring prefill puts the tokens in ring attention's zigzag
        # order here, once; positions travel with them, and the output is put back in order at the end.
        n_ring = ring.ring_size()
        zigzag = cache is None and n_ring > 1 and impl in ("auto", "ring")
        if zigzag:
            tokens, positions = ring.to_zigzag(tokens, n_ring), ring.to_zigzag(positions, n_ring, fill=-1)
        h = constrain(embed_rows(self.embed[...], tokens, cfg.dtype), HIDDEN_AXES)  # [B, T, D]
        cos, sin = rope_tables(positions, cfg)
        layer_params = nnx.to_pure_dict(nnx.state(self.layers))

        if cache is None:

            def step(h, p):
                h, _ = _decoder_layer(cfg, impl, p, h, positions, cos, sin, kv=None, zigzag=zigzag)
                return constrain(h, HIDDEN_AXES), None

            h = over_layers(step, h, layer_params)
        else:
            start = cache.end  # [] or [B]
            k_pos = kernels.write_rows(cache.pos, positions, start)  # [B, S]

            def step(carry, p):
                h, arrays, i = carry
                h, arrays = _decoder_layer(cfg, impl, p, h, positions, cos, sin, kv=(arrays, i, start, k_pos))
                return (constrain(h, HIDDEN_AXES), arrays, i + 1), None

            arrays = (cache.k, cache.v) if cache.k_scale is None else (cache.k, cache.v, cache.k_scale, cache.v_scale)
            h, arrays, _ = over_layers(step, (h, arrays, jnp.zeros((), jnp.int32)), layer_params)
            cache = KVCache(*arrays[:2], pos=k_pos, end=start + tokens.shape[1], k_scale=None, v_scale=None)
            if len(arrays) == 4:
                cache.k_scale, cache.v_scale = arrays[2:]

        if logits == "last":
            last = ring.zigzag_place(T - 1, T, n_ring) if zigzag else h.shape[1] - 1
            h = h[:, last : last + 1]
        h = rms_norm(h, self.final_norm[...], cfg.rms_norm_eps)
        head = {"lm_head": self.lm_head[...], "lm_head_scale": self.lm_head_scale[...] if cfg.quant else None}
        out = linear(cfg, "BTD,DV->BTV", h, head, "lm_head", out_dtype=jnp.float32)
        if zigzag and logits != "last":
            out = ring.from_zigzag(out, T, n_ring)  # undone once, on the logits of the local tokens
        return out, cache


def embed_rows(table: Array, tokens: Array, dtype) -> Array:
    """`jnp.take(table, tokens, axis=0)` in `dtype`. The CPU layout (glm4_jax.engine.cpu_params) holds a bf16 table
    as its 16-bit patterns, gathered as integers: XLA's CPU gather of bf16 converts the whole table to float32,
    which a compiled loop hoists (a float32 copy of the table in its temp memory)."""
    rows = jnp.take(table, tokens, axis=0)
    return jax.lax.bitcast_convert_type(rows, dtype) if table.dtype == jnp.uint16 else rows


def over_layers(step, carry, layer_params: dict):
    """`jax.lax.scan(step, carry, layer_params)`'s final carry. With the layers held apart (each parameter a tuple
    of its L per-layer arrays: the Generator's layout on a CPU device, glm4_jax.engine.cpu_params) the layers are
    unrolled instead, so that each matmul reads its own layer's array in place: XLA's CPU matmuls copy a slice of
    a stacked array first, 0.75x the model's bytes of copies at every call."""
    first = next(iter(layer_params.values()))
    if not isinstance(first, tuple):
        return jax.lax.scan(step, carry, layer_params)[0]
    for i in range(len(first)):
        carry, _ = step(carry, {name: value[i] for name, value in layer_params.items()})
    return carry


def linear(cfg: Config, spec: str, x: Array, p: dict, name: str, out_dtype=None) -> Array:
    """`jnp.einsum(spec, x, p[name])`, or with cfg.quant the matmul that reads the quantized matrix and its scales
    `p[name + "_scale"]` (glm4_jax/qmatmul.py). The contracted axes are x's last ones and the matrix's first ones."""
    path = name if name == "lm_head" else f"layers/{name}"
    if not cfg.quant or path not in MODEL_QUANTIZED:  # (a float32 matrix with bf16 x, on CPU: the product cast back)
        w = p[name]
        lhs, rhs, out = spec.replace("->", ",").split(",")
        merged = len(rhs) - w.ndim  # the CPU layout stores o as [N * H, D] (glm4_jax.engine.cpu_params)
        if merged > 0:
            x = x.reshape(*x.shape[: x.ndim - merged - 1], -1)
            spec = f"{lhs[: -merged - 1]}X,X{rhs[merged + 1 :]}->{out}"
        return jnp.einsum(spec, x, w, preferred_element_type=out_dtype).astype(out_dtype or x.dtype)
    n_in = len(MODEL_QUANTIZED[path])
    w, scale = p[name], p[f"{name}_scale"]
    return qmatmul.linear(x, w, scale, n_in=n_in, quant=cfg.quant, group=cfg.group_size, out_dtype=out_dtype)


def _decoder_layer(
    cfg: Config, impl: str, p: dict, h: Array, positions: Array, cos: Array, sin: Array, kv, zigzag: bool = False
):
    """One pre-norm decoder layer (GLM-4-0414: the attention and MLP outputs normed again before each residual
    add). With `kv` = (cache arrays, layer index, first slot, slot positions), the new keys and values are written
    into the cache in place and attention runs over all its slots. The cache arrays are (k, v), or
    (k, v, k_scale, v_scale) for an int8 cache, whose layer is dequantized for attention."""
    with jax.named_scope("attention"):
        x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
        qkv = linear(cfg, "BTD,DJPH->BTJPH", x, p, "qkv")  # one matmul: q, k and v of every kv group
        if cfg.attention_bias:
            qkv = qkv + p["qkv_bias"]
        q, k, v = split("layers/qkv", qkv, cfg.num_kv_heads)  # [B, T, N, H], [B, T, K, H] (copy 0 of each kv head)
        # k and v sharded like the cache's kv heads (replicated when the tensor axis exceeds them, the kv copies then
        # living on other devices): XLA gathers these few values, where it would otherwise all-reduce the cache.
        k, v = (constrain(x, KV_AXES) for x in (k, v))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv is None:
            attn = attention.attend(q, k, v, positions, positions, impl=impl, zigzag=zigzag)
            new_kv = None
        else:
            arrays, i, start, k_pos = kv  # k, v: [L, B, S, K, H]
            if len(arrays) == 2:
                ck, cv = kernels.write_kv(*arrays, k, v, i, start)
            else:
                (kq, ks), (vq, vs) = kernels.quantize_kv(k), kernels.quantize_kv(v)
                ck, cv = kernels.write_kv(*arrays[:2], kq, vq, i, start)
                cks, cvs = kernels.write_kv(*arrays[2:], ks, vs, i, start)
                cks, cvs = constrain(cks, KVCache.SCALE_AXES["k_scale"]), constrain(cvs, KVCache.SCALE_AXES["v_scale"])
            # Keep the stacked cache in its own sharding: when the tensor axis is larger than the kv heads, XLA
            # would otherwise split it inside the layer loop and gather all of it back on every step.
            ck, cv = constrain(ck, KVCache.AXES["k"]), constrain(cv, KVCache.AXES["v"])
            if len(arrays) == 2:
                attn = attention.attend(q, ck, cv, positions, k_pos, impl=impl, layer=i)
                new_kv = (ck, cv)
            else:  # this layer's keys and values dequantized ([B, S, K, H], one layer at a time)
                keys = kernels.dequantize_kv(ck, cks, i, q.dtype)
                values = kernels.dequantize_kv(cv, cvs, i, q.dtype)
                attn = attention.attend(q, keys, values, positions, k_pos, impl=impl)
                new_kv = (ck, cv, cks, cvs)
        out = linear(cfg, "BTNH,NHD->BTD", attn, p, "o")
        if cfg.post_norms:
            out = rms_norm(out, p["post_attn_norm"], cfg.rms_norm_eps)
        h = h + out
    with jax.named_scope("mlp"):
        x = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)
        gate, up = split("layers/gate_up", linear(cfg, "BTD,DPF->BTPF", x, p, "gate_up"), cfg.num_kv_heads)
        out = linear(cfg, "BTF,FD->BTD", jax.nn.silu(gate) * up, p, "down")
        if cfg.post_norms:
            out = rms_norm(out, p["post_mlp_norm"], cfg.rms_norm_eps)
        h = h + out
    return h, new_kv


# ---- construction helpers -------------------------------------------------------------------------------------


def init_model(cfg: Config, seed: int = 0) -> GLM4:
    """A GLM4 with random weights (normal, std 0.02; norms at 1), one copy of each kv head."""
    return GLM4(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: Config, kv_copies: int = 1) -> GLM4:
    """A GLM4 whose parameters are `jax.ShapeDtypeStruct`s: shapes without allocating."""
    return nnx.eval_shape(lambda: GLM4(cfg, rngs=nnx.Rngs(params=0), kv_copies=kv_copies))


def param_axes(model: GLM4) -> dict:
    """The logical axis names of every parameter, as a nested dict shaped like the parameters."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return unflatten(("/".join(map(str, path)), var.get_metadata()["axes"]) for path, var in flat)


def param_count(model: GLM4) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
