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

# Weight quantization (glm4_jax/quant.py): int8 symmetric per output channel; int4 symmetric in groups of
# `group_size` along the input dimension, two values per byte.
QUANT_SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
# The quantized matrices and their contracted (input) axes; the embedding table (one row read per token), the norms
# and the biases stay in `dtype`. int4 groups run along the last contracted axis (head_dim for `o`, so no group
# spans two heads), and its values are packed in pairs along it.
QUANTIZED = {
    "layers/q": (1,),
    "layers/k": (1,),
    "layers/v": (1,),
    "layers/o": (1, 2),
    "layers/gate": (1,),
    "layers/up": (1,),
    "layers/down": (1,),
    "lm_head": (0,),
}

# The model fuses matrices that read the same input into one (docs/DESIGN.md, "Fused projections"): q, k and v
# into `qkv`, gate and up into `gate_up`, with their biases and scales. Checkpoints keep the parts (the stored
# layout); the loader and the random initializers build the fused arrays (`Config.model_layout`). Each fused path
# and its parts, in order.
FUSED = {
    "layers/qkv": ("layers/q", "layers/k", "layers/v"),
    "layers/qkv_bias": ("layers/q_bias", "layers/k_bias", "layers/v_bias"),
    "layers/qkv_scale": ("layers/q_scale", "layers/k_scale", "layers/v_scale"),
    "layers/gate_up": ("layers/gate", "layers/up"),
    "layers/gate_up_scale": ("layers/gate_scale", "layers/up_scale"),
}
# The quantized matrices of the model (QUANTIZED with the fused ones in place of their parts).
MODEL_QUANTIZED = {
    path: axes for path, axes in QUANTIZED.items() if path not in {p for parts in FUSED.values() for p in parts}
} | {"layers/qkv": (1,), "layers/gate_up": (1,)}


def kv_copies(num_kv_heads: int, tensor: int) -> int:
    """The copies of each kv head in the fused `qkv` for a `tensor` mesh axis of this size: 1 when the axis
    divides the kv heads, else tensor / kv heads (so that the kv groups split evenly over the axis; each device
    then holds its query heads and one copy of their kv head)."""
    if tensor <= num_kv_heads or tensor % num_kv_heads:
        return 1
    return tensor // num_kv_heads


# The fields of the KV cache (glm4_jax.model.KVCache) and the logical axes of each.
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "pos": ("batch", "cache_seq"),
    "end": (),
}
# An int8 cache also holds one float32 scale per token and kv head, shaped [L, B, S, K, 1] like its k and v.
CACHE_SCALE_AXES: dict[str, tuple[str, ...]] = {"k_scale": CACHE_AXES["k"], "v_scale": CACHE_AXES["v"]}
KV_CACHE_DTYPES = (*DTYPES, "int8")
# The cache of the continuous-batching engine (glm4_jax.batching): each row has its own next slot.
ROW_CACHE_AXES: dict[str, tuple[str, ...]] = {**CACHE_AXES, "end": ("batch",)}


def np_dtype(name: str):
    """The numpy dtype for a Config dtype name ("bfloat16" is ml_dtypes' type), a stored quantized dtype ("int8",
    "uint8": int4 pairs) or an int32 cache field."""
    import ml_dtypes
    import numpy as np

    if name not in DTYPES and name not in ("int8", "uint8", "int32"):
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
    quant: str | None = None  # None, or the weight quantization of QUANTIZED's matrices: "int8" or "int4"
    group_size: int = DEFAULT_GROUP_SIZE  # int4: values per scale along the input dimension
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
        if self.quant is not None and self.quant not in QUANT_SCHEMES:
            raise ConfigError(f"quantization must be one of {', '.join(QUANT_SCHEMES)}, got {self.quant!r}")
        if self.quant == "int4":
            self._check_groups()
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

    def _check_groups(self) -> None:
        g = self.group_size
        if not isinstance(g, int) or g < 2 or g % 2:
            raise ConfigError(f"the int4 group size must be an even integer >= 2, got {g!r}")
        layout = self.param_layout()
        for path, contracted in QUANTIZED.items():
            shape, axes = layout[path]
            last = contracted[-1]
            if shape[last] % g:
                raise ConfigError(
                    f"group size {g} does not divide the input dimension of {path} "
                    f"({axes[last]} = {shape[last]}); choose a divisor of {shape[last]}"
                )

    def stored_layout(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
        """The arrays the model holds and a checkpoint stores: path -> (shape, logical axes, dtype name).

        Without quantization, `param_layout()` in `dtype`. With `quant`, each matrix of QUANTIZED is stored as its
        quantized values at the same path plus `{path}_scale` in `dtype` (glm4_jax/quant.py):
          int8: values int8, the matrix's shape; scale: its shape without the contracted axes (one per output);
          int4: values uint8, two per byte along the last contracted axis (half its length); scale: the matrix's
            shape with that axis divided by `group_size` (one per group).
        Scales carry the logical axes of their matrix, so they shard with it.
        """
        out = {}
        for path, (shape, axes) in self.param_layout().items():
            contracted = QUANTIZED.get(path) if self.quant else None
            if contracted is None:
                out[path] = (shape, axes, self.dtype)
            elif self.quant == "int8":
                out[path] = (shape, axes, "int8")
                keep = [i for i in range(len(shape)) if i not in contracted]
                out[path + "_scale"] = (tuple(shape[i] for i in keep), tuple(axes[i] for i in keep), self.dtype)
            else:
                last = contracted[-1]
                packed = tuple(n // 2 if i == last else n for i, n in enumerate(shape))
                groups = tuple(n // self.group_size if i == last else n for i, n in enumerate(shape))
                out[path] = (packed, axes, "uint8")
                out[path + "_scale"] = (groups, axes, self.dtype)
        return out

    def model_layout(self, kv_copies: int = 1) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
        """The arrays the model holds: `stored_layout()` with the parts of each FUSED array replaced by it, at the
        place of its first part. With G = N / K query heads per kv head and c = `kv_copies` (`kv_copies()`):
          qkv [L, D, K*c, G/c + 2, H] (kv_groups, None, head_dim): kv group j holds query heads j*G/c .. of kv
            head j // c, then a copy of that head's k, then of its v; its bias [L, K*c, G/c + 2, H] likewise;
          gate_up [L, D, 2, F] (None, ffn): gate, then up.
        Quantized values and scales fuse the same way along their output axes (the contracted ones are untouched,
        so every int8 scale and every int4 group stays what it was)."""
        stored = self.stored_layout()
        K, c = self.num_kv_heads, kv_copies
        if c < 1 or (self.num_heads // K) % c:
            raise ConfigError(f"kv_copies {c} must divide the {self.num_heads // K} query heads of a kv head")
        owner = {parts[0]: path for path, parts in FUSED.items()}
        inner = {p for parts in FUSED.values() for p in parts[1:]}
        out = {}
        for path, (shape, axes, dtype) in stored.items():
            if path in inner:
                continue
            if path not in owner:
                out[path] = (shape, axes, dtype)
                continue
            fused = owner[path]
            if fused.startswith("layers/qkv"):
                G = self.num_heads // K
                shape = (*shape[:-2], K * c, G // c + 2, shape[-1])
                axes = (*axes[:-2], "kv_groups", None, axes[-1])
            else:
                shape, axes = (*shape[:-1], 2, shape[-1]), (*axes[:-1], None, axes[-1])
            out[fused] = (shape, axes, dtype)
        return out

    def cache_layout(
        self, batch: int, max_len: int, dtype: str | None = None, *, per_row: bool = False
    ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
        """Every field of a KV cache of `batch` rows and `max_len` slots: name -> (shape, logical axes, dtype).

        k and v hold `dtype` (default the config's; one of KV_CACHE_DTYPES), pos and end int32 (see
        glm4_jax.model.KVCache). An int8 cache adds k_scale and v_scale, float32, one per token and kv head. `end`
        is one slot index for the batch, or with `per_row` one per row ([batch], the continuous-batching cache).
        """
        dtype = dtype or self.dtype
        if dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"the KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {dtype!r}")
        kv = (self.num_layers, batch, max_len, self.num_kv_heads, self.head_dim)
        shapes = {"k": kv, "v": kv, "pos": (batch, max_len), "end": (batch,) if per_row else ()}
        dtypes = {"k": dtype, "v": dtype, "pos": "int32", "end": "int32"}
        axes = ROW_CACHE_AXES if per_row else CACHE_AXES
        out = {name: (shapes[name], axes[name], dtypes[name]) for name in axes}
        if dtype == "int8":
            out |= {name: ((*kv[:-1], 1), axes, "float32") for name, axes in CACHE_SCALE_AXES.items()}
        return out

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
        if not isinstance(d, dict):
            raise ConfigError(f"config.json holds a {type(d).__name__}, not a JSON object")
        kind = d.get("model_type")
        if kind is not None and not isinstance(kind, str):
            raise ConfigError(f"model_type {kind!r} is not a string")
        _check_fields(d, kind)
        if kind == "glm4_jax":
            fields = {f.name for f in dataclasses.fields(cls)}
            kw = {k: v for k, v in d.items() if k in fields}
            kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", CHAT_STOP_IDS))
            try:
                return cls(**kw)
            except (TypeError, ValueError, ZeroDivisionError) as e:
                raise ConfigError(f"a field has a wrong type or value ({e})") from None
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
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config") from None
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


# The config.json fields that the readers below convert, by layout: sizes (integers >= 1), other integers (>= 0),
# numbers (> 0), flags, and token ids (an integer >= 0 or a list of them). `_check_fields` checks each one present,
# so a wrong type is a ConfigError naming the field, never a TypeError from deep inside.
_SIZES = {
    "chatglm": (
        "hidden_size",
        "num_attention_heads",
        "padded_vocab_size",
        "ffn_hidden_size",
        "num_layers",
        "multi_query_group_num",
        "kv_channels",
        "seq_length",
    ),
    "hf": (
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "original_max_position_embeddings",
    ),
}
_NUMBERS = {
    "chatglm": ("rope_ratio", "layernorm_epsilon"),
    "hf": ("rope_theta", "partial_rotary_factor", "rms_norm_eps"),
}
_FLAGS = (
    "rmsnorm",
    "post_layer_norm",
    "add_bias_linear",
    "apply_residual_connection_post_layernorm",
    "tie_word_embeddings",
    "multi_query_attention",
    "add_qkv_bias",
    "attention_bias",
)


_MAY_BE_NULL = {"num_key_value_heads", "head_dim", "original_max_position_embeddings", "pad_token_id"}  # defaults


def _check_fields(d: dict[str, Any], kind: str | None) -> None:
    layout = "chatglm" if kind == "chatglm" else "hf" if kind in ("glm", "glm4") else None
    if layout is None:
        return
    for key in (*_SIZES[layout], *_NUMBERS[layout], *_FLAGS, "eos_token_id"):
        if key in d and d[key] is None and key not in _MAY_BE_NULL:
            raise ConfigError(f"{key} is null; give it a value or leave it out")
    for key in _SIZES[layout]:
        v = d.get(key)
        if v is not None and not (type(v) is int and 1 <= v <= 2**40):
            raise ConfigError(f"{key} is {v!r}; it must be a positive integer")
    for key in _NUMBERS[layout]:
        v = d.get(key)
        if v is not None and not (type(v) in (int, float) and 0 < v < 1e30):
            raise ConfigError(f"{key} is {v!r}; it must be a number > 0")
    for key in _FLAGS:
        v = d.get(key)
        if v is not None and type(v) is not bool:
            raise ConfigError(f"{key} is {v!r}; it must be true or false")
    for key in ("eos_token_id", "pad_token_id"):
        v = d.get(key)
        ids = v if isinstance(v, list) and key == "eos_token_id" else [v]
        if v is not None and not (ids and all(type(i) is int and 0 <= i < 2**40 for i in ids)):
            raise ConfigError(
                f"{key} is {v!r}; it must be a token id (an integer >= 0){' or a list' * (key[0] == 'e')}"
            )
    for key in ("rope_scaling", "rope_parameters"):
        v = d.get(key)
        if isinstance(v, dict):
            for name in ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                x = v.get(name)
                if x is not None and not (type(x) in (int, float) and 0 <= x < 1e30):
                    raise ConfigError(f"{key}.{name} is {x!r}; it must be a number >= 0")
            x = v.get("original_max_position_embeddings")
            if x is not None and not (type(x) is int and 1 <= x <= 2**40):
                raise ConfigError(f"{key}.original_max_position_embeddings is {x!r}; it must be a positive integer")


def _require(d: dict[str, Any], key: str):
    if d.get(key) is None:
        raise ConfigError(f"config.json has no {key!r}" if key not in d else f"{key} is null; it must be set")
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
        num_kv_heads=int(_require(d, "multi_query_group_num")) if mq else heads,
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
