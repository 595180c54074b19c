"""The GLM-4 decoder in Flax NNX, readable top to bottom.

Einsum letters:
    B batch, T query length, S key length (cache slots), D model width (hidden_size), N query heads,
    K kv heads, G query heads per kv head (N = K * G), H head dim, F ffn width, V vocabulary, L layers.

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
from flax import nnx

from glm4_jax import attention, kernels
from glm4_jax.config import CACHE_AXES, ROW_CACHE_AXES, Config
from glm4_jax.paths import unflatten
from glm4_jax.sharding.rules import constrain

Array = jax.Array

# ---- parameters ---------------------------------------------------------------------------------------------


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _param(cfg: Config, path: str, rngs: nnx.Rngs, init: str = "normal") -> nnx.Param:
    """The parameter at `path` of `Config.param_layout` (shape and logical axes): normal(0.02) or ones."""
    shape, axes = cfg.param_layout()[path]
    dt = jnp.dtype(cfg.dtype)
    value = jnp.ones(shape, dt) if init == "ones" else _normal(rngs, shape, dt)
    return nnx.Param(value, axes=axes)


class Layers(nnx.Module):
    """The weights of all decoder layers, stacked along a leading L axis."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        def p(name, init="normal"):
            return _param(cfg, "layers/" + name, rngs, init)

        self.attn_norm = p("attn_norm", "ones")
        self.q = p("q")  # [L, D, N, H]
        self.k = p("k")  # [L, D, K, H]
        self.v = p("v")  # [L, D, K, H]
        if cfg.attention_bias:
            self.q_bias = p("q_bias")  # [L, N, H]
            self.k_bias = p("k_bias")  # [L, K, H]
            self.v_bias = p("v_bias")  # [L, K, H]
        self.o = p("o")  # [L, N, H, D]
        self.mlp_norm = p("mlp_norm", "ones")
        self.gate = p("gate")  # [L, D, F]
        self.up = p("up")  # [L, D, F]
        self.down = p("down")  # [L, F, D]


# ---- KV cache -------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys (already rotated) and values of every layer, plus the position held in each slot.

    In a static batch all rows are written at the same slots (prompts are left-padded), so one `end` [] serves the
    batch. In the continuous-batching engine (glm4_jax.batching) every row is a request of its own and `end` is
    [B]: row b writes at its own slots [end[b], end[b] + T).
    """

    k: Array  # [L, B, S, K, H]
    v: Array  # [L, B, S, K, H]
    pos: Array  # [B, S] int32: the position of the token in each slot; -1 for empty slots and padding
    end: Array  # [] or [B] int32: the next slot to write (of the batch, or of each row)

    AXES = CACHE_AXES  # the logical axes of each field (glm4_jax.config); ROW_AXES with a per-row `end`
    ROW_AXES = ROW_CACHE_AXES

    @classmethod
    def init(cls, cfg: Config, batch: int, max_len: int, dtype=None, *, per_row: bool = False) -> KVCache:
        """An empty cache: shapes from `cfg.cache_layout(batch, max_len, per_row=)`, k and v in `dtype` (default
        cfg.dtype)."""
        shapes = {name: shape for name, (shape, _) in cfg.cache_layout(batch, max_len, per_row=per_row).items()}
        dt = jnp.dtype(dtype or cfg.dtype)
        return cls(
            k=jnp.zeros(shapes["k"], dt),
            v=jnp.zeros(shapes["v"], dt),
            pos=jnp.full(shapes["pos"], -1, jnp.int32),
            end=jnp.zeros(shapes["end"], jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]


# ---- building blocks ----------------------------------------------------------------------------------------


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm with the variance and the scaling in float32, cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: Array, cfg: Config) -> tuple[Array, Array]:
    """cos and sin, [B, T, rotary_dim // 2] in float32, for positions [B, T]."""
    half = cfg.rotary_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
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

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, attention_impl: str = "auto"):
        self.cfg = cfg
        # Static choice of attention kernel (see glm4_jax.attention.IMPLEMENTATIONS); may be set after construction.
        self.attention_impl = attention_impl
        self.embed = _param(cfg, "embed", rngs)  # [V, D]
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = _param(cfg, "final_norm", rngs, "ones")  # [D]
        self.lm_head = _param(cfg, "lm_head", rngs)  # [D, V]

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
        h = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D]
        cos, sin = rope_tables(positions, cfg)
        layer_params = nnx.to_pure_dict(nnx.state(self.layers))

        if cache is None:

            def step(h, p):
                h, _ = _decoder_layer(cfg, impl, p, h, positions, cos, sin, kv=None)
                return h, None

            h, _ = jax.lax.scan(step, h, layer_params)
        else:
            start = cache.end  # [] or [B]
            k_pos = kernels.write_rows(cache.pos, positions, start)  # [B, S]

            def step(carry, p):
                h, ck, cv, i = carry
                h, (ck, cv) = _decoder_layer(cfg, impl, p, h, positions, cos, sin, kv=(ck, cv, i, start, k_pos))
                return (h, ck, cv, i + 1), None

            init = (h, cache.k, cache.v, jnp.zeros((), jnp.int32))
            (h, ck, cv, _), _ = jax.lax.scan(step, init, layer_params)
            cache = KVCache(k=ck, v=cv, pos=k_pos, end=start + tokens.shape[1])

        if logits == "last":
            h = h[:, -1:]
        h = rms_norm(h, self.final_norm[...], cfg.rms_norm_eps)
        out = jnp.einsum("BTD,DV->BTV", h, self.lm_head[...], preferred_element_type=jnp.float32)
        return out, cache


def _decoder_layer(cfg: Config, impl: str, p: dict, h: Array, positions: Array, cos: Array, sin: Array, kv):
    """One pre-norm decoder layer. With `kv` = (cache k, cache v, layer index, first slot, slot positions), the
    new keys and values are written into the cache in place and attention runs over all its slots."""
    with jax.named_scope("attention"):
        x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
        q = jnp.einsum("BTD,DNH->BTNH", x, p["q"])
        k = jnp.einsum("BTD,DKH->BTKH", x, p["k"])
        v = jnp.einsum("BTD,DKH->BTKH", x, p["v"])
        if cfg.attention_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv is None:
            attn = attention.attend(q, k, v, positions, positions, impl=impl)
            new_kv = None
        else:
            ck, cv, i, start, k_pos = kv  # ck, cv: [L, B, S, K, H]
            ck, cv = kernels.write_kv(ck, cv, k, v, i, start)
            # Keep the stacked cache in its own sharding: when the tensor axis is larger than the kv heads, XLA
            # would otherwise split it inside the layer loop and gather all of it back on every step.
            ck, cv = constrain(ck, KVCache.AXES["k"]), constrain(cv, KVCache.AXES["v"])
            attn = attention.attend(q, ck, cv, positions, k_pos, impl=impl, layer=i)
            new_kv = (ck, cv)
        h = h + jnp.einsum("BTNH,NHD->BTD", attn, p["o"])
    with jax.named_scope("mlp"):
        x = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)
        gate = jnp.einsum("BTD,DF->BTF", x, p["gate"])
        up = jnp.einsum("BTD,DF->BTF", x, p["up"])
        h = h + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, p["down"])
    return h, new_kv


# ---- construction helpers -------------------------------------------------------------------------------------


def init_model(cfg: Config, seed: int = 0) -> GLM4:
    """A GLM4 with random weights (normal, std 0.02; norms at 1)."""
    return GLM4(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: Config) -> GLM4:
    """A GLM4 whose parameters are `jax.ShapeDtypeStruct`s: shapes without allocating."""
    return nnx.eval_shape(lambda: GLM4(cfg, rngs=nnx.Rngs(params=0)))


def param_axes(model: GLM4) -> dict:
    """The logical axis names of every parameter, as a nested dict shaped like the parameters."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return unflatten(("/".join(map(str, path)), var.get_metadata()["axes"]) for path, var in flat)


def param_count(model: GLM4) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
