"""GLM-4 model configuration.

One frozen (hashable) dataclass, built from either `config.json` layout a GLM-4 checkpoint ships with:

* the original THUDM layout (`model_type` "chatglm": num_layers, ffn_hidden_size, kv_channels,
  multi_query_group_num, padded_vocab_size, seq_length, rope_ratio, ...);
* the transformers layout (`model_type` "glm", `GlmForCausalLM`), with the RoPE settings either at the top
  level (`rope_theta`, `partial_rotary_factor`) or nested in `rope_parameters`.

Because it is hashable, a Config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Token ids fixed by the GLM-4 tokenizer (see glm4_jax/tokenizer.py).
ENDOFTEXT_ID = 151329
USER_ID = 151336
OBSERVATION_ID = 151338
CHAT_STOP_IDS = (ENDOFTEXT_ID, USER_ID, OBSERVATION_ID)

DTYPES = ("bfloat16", "float32", "float16")

# The fields of the KV cache (glm4_jax.model.KVCache) and the logical axes of each.
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "pos": ("batch", "cache_seq"),
    "end": (),
}
# The cache of the continuous-batching engine (glm4_jax.batching): each row has its own next slot.
ROW_CACHE_AXES: dict[str, tuple[str, ...]] = {**CACHE_AXES, "end": ("batch",)}


def np_dtype(name: str):
    """The numpy dtype for a Config dtype name ("bfloat16" is ml_dtypes' type)."""
    import ml_dtypes
    import numpy as np

    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class ConfigError(ValueError):
    """A config.json that cannot describe a supported GLM-4 model."""


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 151552  # embedding rows; ids >= the tokenizer's 151343 are padding rows
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2  # `multi_query_group_num`: 2 in glm-4-9b(-chat), 4 in glm-4-9b-chat-1m
    head_dim: int = 128  # `kv_channels`
    rope_theta: float = 5_000_000.0  # 10000 * rope_ratio in the THUDM layout
    partial_rotary_factor: float = 0.5  # RoPE rotates the first half of each head, pairs (0,1), (2,3), ...
    rms_norm_eps: float = 1.5625e-07
    max_seq_len: int = 131072  # `seq_length` / `max_position_embeddings`
    attention_bias: bool = True  # bias on the Q, K and V projections only
    eos_token_ids: tuple[int, ...] = CHAT_STOP_IDS
    pad_token_id: int = ENDOFTEXT_ID
    dtype: str = "bfloat16"  # parameters and activations; norms, RoPE and softmax always run in float32

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} x head_dim {self.head_dim} "
                "must give an even number of rotary dims"
            )
        for name, ids in (("pad_token_id", (self.pad_token_id,)), ("eos_token_ids", self.eos_token_ids)):
            if not all(0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"{name} {ids} must lie in the vocabulary [0, {self.vocab_size})")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def param_layout(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Every parameter of the model: path ("layers/q") -> (shape, logical axis names).

        The one table of parameter shapes: `glm4_jax.model.GLM4` builds its parameters from it, and the converter
        and checkpoint code read it without importing JAX. Letters as in glm4_jax/model.py; the layers are stacked
        along a leading L axis.
        """
        L, D, N, K, H, F, V = (
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size,
        )
        layout = {
            "embed": ((V, D), ("vocab", "embed")),
            "layers/attn_norm": ((L, D), ("layers", "norm")),
            "layers/q": ((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
            "layers/k": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
            "layers/v": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        }
        if self.attention_bias:
            layout["layers/q_bias"] = ((L, N, H), ("layers", "q_heads", "head_dim"))
            layout["layers/k_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
            layout["layers/v_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
        layout |= {
            "layers/o": ((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
            "layers/mlp_norm": ((L, D), ("layers", "norm")),
            "layers/gate": ((L, D, F), ("layers", "embed", "ffn")),
            "layers/up": ((L, D, F), ("layers", "embed", "ffn")),
            "layers/down": ((L, F, D), ("layers", "ffn", "embed")),
            "final_norm": ((D,), ("norm",)),
            "lm_head": ((D, V), ("embed", "vocab")),
        }
        return layout

    def cache_layout(
        self, batch: int, max_len: int, *, per_row: bool = False
    ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Every field of a KV cache of `batch` rows and `max_len` slots: name -> (shape, logical axis names).

        k and v hold `dtype` (the config's by default), pos and end int32 (see glm4_jax.model.KVCache). `end` is
        one slot index for the batch, or with `per_row` one per row ([batch], the continuous-batching cache).
        """
        kv = (self.num_layers, batch, max_len, self.num_kv_heads, self.head_dim)
        shapes = {"k": kv, "v": kv, "pos": (batch, max_len), "end": (batch,) if per_row else ()}
        axes = ROW_CACHE_AXES if per_row else CACHE_AXES
        return {name: (shapes[name], axes[name]) for name in axes}

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    # ---- serialization -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return {"model_type": "glm4_jax", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Builds a Config from any supported config.json dictionary."""
        kind = d.get("model_type")
        if kind == "glm4_jax":
            fields = {f.name for f in dataclasses.fields(cls)}
            kw = {k: v for k, v in d.items() if k in fields}
            kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", CHAT_STOP_IDS))
            return cls(**kw)
        if kind == "chatglm":
            return _from_chatglm(d)
        if kind == "glm":
            return _from_hf_glm(d)
        if kind in ("glm4", "glm4_moe") or "Glm4ForCausalLM" in d.get("architectures", []):
            raise ConfigError(
                f"model_type {kind!r} (GLM-4-0414 / Glm4ForCausalLM, with two extra norms per layer) is not "
                "supported; glm4-jax runs GLM-4-9B (model_type 'chatglm' or 'glm')"
            )
        raise ConfigError(f"unknown model_type {kind!r}: expected 'chatglm' (THUDM) or 'glm' (transformers)")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    # ---- presets (published configs; a converted checkpoint always uses its own config.json) -----------------

    @classmethod
    def glm_4_9b_chat(cls) -> Config:
        return cls()

    @classmethod
    def glm_4_9b(cls) -> Config:
        # The base model: 8K context. Its rope_ratio is not confirmed from a config.json here: 1 assumed.
        return cls(max_seq_len=8192, rope_theta=10000.0, eos_token_ids=(ENDOFTEXT_ID,))

    @classmethod
    def glm_4_9b_chat_1m(cls) -> Config:
        # 4 kv heads and rope_ratio 10000 as published for the 1M model (not read from its config.json here).
        return cls(num_kv_heads=4, max_seq_len=1048576, rope_theta=1e8)


PRESETS = {
    "glm-4-9b": Config.glm_4_9b,
    "glm-4-9b-chat": Config.glm_4_9b_chat,
    "glm-4-9b-chat-1m": Config.glm_4_9b_chat_1m,
}


def preset(name: str) -> Config:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _require(d: dict[str, Any], key: str):
    if key not in d:
        raise ConfigError(f"config.json has no {key!r}")
    return d[key]


def _eos(d: dict[str, Any]) -> tuple[int, ...]:
    eos = d.get("eos_token_id", list(CHAT_STOP_IDS))
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _from_chatglm(d: dict[str, Any]) -> Config:
    if not d.get("rmsnorm", True) or not d.get("post_layer_norm", True):
        raise ConfigError("only rmsnorm=true, post_layer_norm=true checkpoints are GLM-4")
    if d.get("add_bias_linear", False) or d.get("apply_residual_connection_post_layernorm", False):
        raise ConfigError("add_bias_linear / apply_residual_connection_post_layernorm are not used by GLM-4")
    if d.get("tie_word_embeddings", False):
        raise ConfigError("tied word embeddings are not supported (GLM-4 has an untied output layer)")
    hidden = int(_require(d, "hidden_size"))
    heads = int(_require(d, "num_attention_heads"))
    mq = d.get("multi_query_attention", True)
    return Config(
        vocab_size=int(_require(d, "padded_vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(d, "ffn_hidden_size")),
        num_layers=int(_require(d, "num_layers")),
        num_heads=heads,
        num_kv_heads=int(d["multi_query_group_num"]) if mq else heads,
        head_dim=int(d.get("kv_channels", hidden // heads)),
        # Computed here on purpose: rope_ratio scales the base 10000.
        rope_theta=10000.0 * float(d.get("rope_ratio", 1.0)),
        partial_rotary_factor=0.5,
        rms_norm_eps=float(d.get("layernorm_epsilon", 1e-5)),
        max_seq_len=int(d.get("seq_length", 8192)),
        attention_bias=bool(d.get("add_qkv_bias", True)),
        eos_token_ids=_eos(d),
        pad_token_id=int(d["pad_token_id"]) if d.get("pad_token_id") is not None else ENDOFTEXT_ID,
    )


def _from_hf_glm(d: dict[str, Any]) -> Config:
    if d.get("tie_word_embeddings", False):
        raise ConfigError("tied word embeddings are not supported (GLM-4 has an untied output layer)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not GLM-4's 'silu'")
    rope = d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or d.get("rope_scaling"):
        raise ConfigError(f"RoPE scaling {rope_type!r} is not supported; GLM-4-9B uses plain RoPE")
    hidden = int(_require(d, "hidden_size"))
    heads = int(_require(d, "num_attention_heads"))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    return Config(
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(d, "intermediate_size")),
        num_layers=int(_require(d, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rope_theta=float(theta),
        partial_rotary_factor=float(factor),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        max_seq_len=int(d.get("max_position_embeddings", 131072)),
        attention_bias=bool(d.get("attention_bias", True)),
        eos_token_ids=_eos(d),
        pad_token_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else ENDOFTEXT_ID),
    )
