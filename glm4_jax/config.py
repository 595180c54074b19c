"""GLM-4 model configuration.

One frozen (hashable) dataclass, built from either `config.json` layout a GLM-4 checkpoint ships with:

* the original THUDM layout (`model_type` "chatglm": num_layers, ffn_hidden_size, kv_channels,
  multi_query_group_num, padded_vocab_size, seq_length, rope_ratio, ...);
* the transformers layout (`model_type` "glm", `GlmForCausalLM`), with the RoPE settings either at the top
  level (`rope_theta`, `partial_rotary_factor`) or nested in `rope_parameters` (or the older `rope_scaling`);
* the GLM-4-0414 layout (`model_type` "glm4", `Glm4ForCausalLM`: GLM-4-9B-0414, GLM-Z1-9B-0414, GLM-4-32B-0414),
  the transformers layout plus two RMSNorms per layer (`post_norms`).

RoPE scaling: plain RoPE or YaRN (`rope_type` "yarn", as transformers' `_compute_yarn_parameters`), read from
`rope_parameters` / `rope_scaling` of either transformers layout.

Because it is hashable, a Config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# Token ids fixed by the GLM-4 tokenizer (see glm4_jax/tokenizer.py).
ENDOFTEXT_ID = 151329
USER_ID = 151336
OBSERVATION_ID = 151338
CHAT_STOP_IDS = (ENDOFTEXT_ID, USER_ID, OBSERVATION_ID)

DTYPES = ("bfloat16", "float32", "float16")
ROPE_TYPES = ("default", "yarn")

# The fields of the KV cache (glm4_jax.model.KVCache) and the logical axes of each.
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "pos": ("batch", "cache_seq"),
    "end": (),
}


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
    # GLM-4-0414 (Glm4ForCausalLM): an RMSNorm on the attention output and one on the MLP output, each applied
    # before its residual add (`post_self_attn_layernorm`, `post_mlp_layernorm`).
    post_norms: bool = False
    # RoPE scaling: "default" (none) or "yarn". The yarn_* fields are those of transformers' rope_parameters, with
    # its defaults; yarn_attention_factor is resolved when the config is read (it scales cos and sin).
    rope_type: str = "default"
    yarn_factor: float = 1.0
    yarn_original_max_seq_len: int = 0  # the pre-training context the correction range is computed from
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float = 1.0
    yarn_truncate: bool = True

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
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_type == "yarn" and (self.yarn_factor <= 0 or self.yarn_original_max_seq_len <= 0):
            raise ConfigError("YaRN needs a factor > 0 and an original context > 0")
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
        }
        if self.post_norms:
            layout["layers/post_attn_norm"] = ((L, D), ("layers", "norm"))
        layout |= {
            "layers/mlp_norm": ((L, D), ("layers", "norm")),
            "layers/gate": ((L, D, F), ("layers", "embed", "ffn")),
            "layers/up": ((L, D, F), ("layers", "embed", "ffn")),
            "layers/down": ((L, F, D), ("layers", "ffn", "embed")),
        }
        if self.post_norms:
            layout["layers/post_mlp_norm"] = ((L, D), ("layers", "norm"))
        layout |= {
            "final_norm": ((D,), ("norm",)),
            "lm_head": ((D, V), ("embed", "vocab")),
        }
        return layout

    def cache_layout(self, batch: int, max_len: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Every field of a KV cache of `batch` rows and `max_len` slots: name -> (shape, logical axis names).

        k and v hold `dtype` (the config's by default), pos and end int32 (see glm4_jax.model.KVCache).
        """
        kv = (self.num_layers, batch, max_len, self.num_kv_heads, self.head_dim)
        shapes = {"k": kv, "v": kv, "pos": (batch, max_len), "end": ()}
        return {name: (shapes[name], axes) for name, axes in CACHE_AXES.items()}

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
        if kind == "glm4":
            return _from_hf_glm(d, post_norms=True)
        if kind is not None and kind.startswith("glm4"):
            raise ConfigError(
                f"model_type {kind!r} is not supported; glm4-jax runs GLM-4-9B (model_type 'chatglm' or 'glm') and "
                "GLM-4-0414 (model_type 'glm4', Glm4ForCausalLM)"
            )
        raise ConfigError(f"unknown model_type {kind!r}: expected 'chatglm' (THUDM), 'glm' or 'glm4' (transformers)")

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

    # The GLM-4-0414 family (Glm4ForCausalLM), from the values of the published config.json files as recalled here:
    # they were not read from the files on this machine (no hub access). Shared by the three: vocab 151552, head dim
    # 128, 2 kv heads, rope_theta 10000, partial_rotary_factor 0.5, rms_norm_eps 1e-5, context 32768, eos
    # [151329, 151336, 151338]. Unverified values are marked. A converted checkpoint uses its own config.json.

    @classmethod
    def glm_4_9b_0414(cls) -> Config:
        # attention_bias: true as recalled for the 9B-0414 (third-party copies disagree: unverified).
        return cls(rms_norm_eps=1e-5, rope_theta=10000.0, max_seq_len=32768, attention_bias=True, post_norms=True)

    @classmethod
    def glm_z1_9b_0414(cls) -> Config:
        # The reasoning model: the same shapes as GLM-4-9B-0414 (attention_bias unverified likewise).
        return cls.glm_4_9b_0414()

    @classmethod
    def glm_4_32b_0414(cls) -> Config:
        # hidden 6144, ffn 23040, 61 layers, 48 query heads, no attention bias (about 32.6B parameters).
        return cls(
            hidden_size=6144,
            intermediate_size=23040,
            num_layers=61,
            num_heads=48,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_seq_len=32768,
            attention_bias=False,
            post_norms=True,
        )

    def with_yarn(self, factor: float = 4.0, original_max_seq_len: int | None = None) -> Config:
        """This config with YaRN scaling (transformers' defaults for the other settings): the context grows to
        `factor` x the original (THUDM recommends factor 4 from 32K for the 0414 models beyond 32K tokens)."""
        original = original_max_seq_len or self.max_seq_len
        return self.replace(
            rope_type="yarn",
            yarn_factor=float(factor),
            yarn_original_max_seq_len=int(original),
            yarn_attention_factor=_yarn_mscale(factor),
            max_seq_len=max(self.max_seq_len, int(original * factor)),
        )


PRESETS = {
    "glm-4-9b": Config.glm_4_9b,
    "glm-4-9b-chat": Config.glm_4_9b_chat,
    "glm-4-9b-chat-1m": Config.glm_4_9b_chat_1m,
    "glm-4-9b-0414": Config.glm_4_9b_0414,
    "glm-z1-9b-0414": Config.glm_z1_9b_0414,
    "glm-4-32b-0414": Config.glm_4_32b_0414,
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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """transformers' `get_mscale`: 0.1 * mscale * ln(scale) + 1, or 1 for scale <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_fields(d: dict[str, Any], rope: dict[str, Any], max_pos: int) -> dict[str, Any]:
    """The RoPE scaling fields of a transformers config, resolved as transformers 5 resolves them
    (`standardize_rope_params`, `_compute_yarn_parameters`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type != "yarn":
        raise ConfigError(f"RoPE scaling {rope_type!r} is not supported (only plain RoPE and 'yarn')")
    if "factor" not in rope:
        raise ConfigError("RoPE scaling 'yarn' needs a 'factor'")
    # A top-level original_max_position_embeddings wins over the one in the RoPE dict; the context otherwise.
    original = int(d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos)
    factor = rope["factor"]
    factor = float(max_pos / original if factor is None else factor)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return {
        "rope_type": "yarn",
        "yarn_factor": factor,
        "yarn_original_max_seq_len": original,
        "yarn_beta_fast": float(rope.get("beta_fast") or 32),  # `or`: transformers reads 0 / None as the default
        "yarn_beta_slow": float(rope.get("beta_slow") or 1),
        "yarn_attention_factor": float(attention_factor),
        "yarn_truncate": bool(rope.get("truncate", True)),
        # The context YaRN opens up: factor x the original, or max_position_embeddings when that is larger.
        "max_seq_len": max(max_pos, int(original * factor)),
    }


def _from_hf_glm(d: dict[str, Any], post_norms: bool = False) -> Config:
    """model_type "glm" (GlmForCausalLM) or, with `post_norms`, "glm4" (Glm4ForCausalLM); a value missing from
    the file takes the default of transformers' GlmConfig / Glm4Config where that differs from ours."""
    if d.get("tie_word_embeddings", False):
        raise ConfigError("tied word embeddings are not supported (GLM-4 has an untied output layer)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not GLM-4's 'silu'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError("rope_parameters must be one dict (per-layer-type RoPE is not GLM-4)")
    max_pos = int(d.get("max_position_embeddings", 131072))
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
        rms_norm_eps=float(d.get("rms_norm_eps", 1.5625e-07 if post_norms else 1e-5)),
        max_seq_len=max_pos,
        attention_bias=bool(d.get("attention_bias", True)),
        eos_token_ids=_eos(d),
        pad_token_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else ENDOFTEXT_ID),
        post_norms=post_norms,
    ).replace(**_rope_fields(d, rope, max_pos))
