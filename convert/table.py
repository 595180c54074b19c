"""The name table: every source tensor of the GLM-4 layouts (THUDM, transformers GLM-4-9B, GLM-4-0414), where it
goes in our tree and how.

One row per source tensor name (`{i}` is the layer index): the source shape the config implies, and one or more
outputs `(destination, transform)`. Fused tensors have several outputs: the THUDM `query_key_value` is
`[all Q | all K | all V]` rows, `dense_h_to_4h` / `gate_up_proj` is `[gate | up]` rows. torch `Linear` weights are
`[out, in]`; ours are `[in, out]` with heads split out (docs/DESIGN.md), so most transforms transpose.

A transform maps a *region* of one destination layer to the block of the source it needs, and builds that region
from the block. Nothing is ever materialized beyond one storage chunk, so the converter's memory stays small.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import numpy as np

from glm4_jax.config import Config, np_dtype
from glm4_jax.fileio import ArraySource, copy_range
from glm4_jax.paths import unflatten

from .readers import ConvertError, TensorInfo, read_block, rows_range


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes the shapes are written with (see the einsum legend in glm4_jax/model.py)."""

    V: int
    D: int
    F: int
    L: int
    N: int
    K: int
    H: int

    @classmethod
    def of(cls, cfg: Config) -> Dims:
        return cls(
            V=cfg.vocab_size,
            D=cfg.hidden_size,
            F=cfg.intermediate_size,
            L=cfg.num_layers,
            N=cfg.num_heads,
            K=cfg.num_kv_heads,
            H=cfg.head_dim,
        )


def _scaled(s: slice, k: int, offset: int = 0) -> slice:
    return slice(offset + s.start * k, offset + s.stop * k)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Writes `x.T` into `out` (C-contiguous, casting if the dtypes differ), a few source rows at a time, so that
    each output row gets a run of contiguous elements: several times faster than numpy's own strided copy for big
    matrices. Same dtypes go through unsigned-int views, so numpy runs its native loops without the GIL even for
    bfloat16; 2-byte elements go two source rows at a time as one 4-byte word (little-endian hosts), which halves
    the strided loop's iterations again."""
    if x.dtype == out.dtype:
        x, out = x.view(_UINT[x.dtype.itemsize]), out.view(_UINT[x.dtype.itemsize])
        m, n = x.shape
        if x.dtype.itemsize == 2 and m % 2 == 0 and sys.byteorder == "little":
            pairs, words = x.reshape(m // 2, 2, n), out.view(np.uint32)  # words[j, i] = x[2i, j] | x[2i+1, j] << 16
            for i in range(0, m // 2, 16):
                w = pairs[i : i + 16, 1].astype(np.uint32)
                w <<= 16
                w |= pairs[i : i + 16, 0]
                words[:, i : i + 16] = w.T
            return out
    for i in range(0, x.shape[0], 16):
        out[:, i : i + 16] = x[i : i + 16].T
    return out


# ---- transforms -------------------------------------------------------------------------------------------------
# Each has `shape(source shape)`, the shape of one destination layer, and `fill(read, region, out)`, which writes
# `destination_layer[region]` into `out` from the source block(s) it reads with `read(rows, cols, into=None)`.


@dataclasses.dataclass(frozen=True)
class Same:
    """Destination = source (embedding, norms)."""

    def shape(self, src: tuple[int, ...]) -> tuple[int, ...]:
        return src

    def fill(self, read, region, out):
        cols = region[1] if len(region) == 2 else None
        if read.dtype == out.dtype:
            read(region[0], cols, into=out)  # straight from the file into the output
        else:
            out[...] = read(region[0], cols)


@dataclasses.dataclass(frozen=True)
class Transpose:
    """Destination [C, n] = source[first : first + n, :].T: a torch Linear [out, in] (or its rows `first` to
    `first + n`, for one half of the fused gate/up) as our [in, out]."""

    first: int
    n: int

    def shape(self, src):
        return (src[1], self.n)

    def fill(self, read, region, out):
        ra, rb = region
        transpose2d(read(_scaled(rb, 1, self.first), ra), out)


@dataclasses.dataclass(frozen=True)
class SplitHeads:
    """Destination [D, heads, H] = source[first : first + heads*H, :].T split into heads: Q, K or V of a fused QKV
    (or of its own projection) as our [embed, heads, head_dim]."""

    first: int
    heads: int
    head_dim: int

    def shape(self, src):
        return (src[1], self.heads, self.head_dim)

    def fill(self, read, region, out):
        rd, rn, rh = region
        block = read(_scaled(rn, self.head_dim, self.first), rd)  # [n*H, d]
        if (rh.start, rh.stop) == (0, self.head_dim):
            transpose2d(block, out.reshape(out.shape[0], -1))  # [d, n*H]
        else:
            out[...] = block.reshape(-1, self.head_dim, block.shape[1])[:, rh, :].transpose(2, 0, 1)


@dataclasses.dataclass(frozen=True)
class SplitHeadsBias:
    """Destination [heads, H] = source[first : first + heads*H] split into heads (QKV biases)."""

    first: int
    heads: int
    head_dim: int

    def shape(self, src):
        return (self.heads, self.head_dim)

    def fill(self, read, region, out):
        rn, rh = region
        out[...] = read(_scaled(rn, self.head_dim, self.first), None).reshape(-1, self.head_dim)[:, rh]


@dataclasses.dataclass(frozen=True)
class MergeHeadsOut:
    """Destination [heads, H, D] = source[D, heads*H].T split into heads: the attention output projection."""

    heads: int
    head_dim: int

    def shape(self, src):
        return (self.heads, self.head_dim, src[0])

    def fill(self, read, region, out):
        rn, rh, rd = region
        block = read(rd, _scaled(rn, self.head_dim))  # [d, n*H]
        if (rh.start, rh.stop) == (0, self.head_dim):
            transpose2d(block, out.reshape(-1, out.shape[2]))  # [n*H, d]
        else:
            out[...] = block.T.reshape(-1, self.head_dim, block.shape[0])[:, rh, :]


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # the tensor's name, with {i} for the layer index
    shape: tuple[int, ...]  # its shape, as the config implies
    outputs: tuple[tuple[str, object], ...]  # (destination path, transform) pairs; () drops the tensor


def thudm_rules(d: Dims, bias: bool) -> list[Rule]:
    """The original THUDM layout (model_type "chatglm")."""
    t = "transformer.encoder.layers.{i}."
    qkv = (d.N + 2 * d.K) * d.H  # rows of the fused [all Q | all K | all V]
    return [
        Rule("transformer.embedding.word_embeddings.weight", (d.V, d.D), (("embed", Same()),)),
        Rule(t + "input_layernorm.weight", (d.D,), (("layers/attn_norm", Same()),)),
        Rule(
            t + "self_attention.query_key_value.weight",
            (qkv, d.D),
            (
                ("layers/q", SplitHeads(0, d.N, d.H)),
                ("layers/k", SplitHeads(d.N * d.H, d.K, d.H)),
                ("layers/v", SplitHeads((d.N + d.K) * d.H, d.K, d.H)),
            ),
        ),
        *(
            [
                Rule(
                    t + "self_attention.query_key_value.bias",
                    (qkv,),
                    (
                        ("layers/q_bias", SplitHeadsBias(0, d.N, d.H)),
                        ("layers/k_bias", SplitHeadsBias(d.N * d.H, d.K, d.H)),
                        ("layers/v_bias", SplitHeadsBias((d.N + d.K) * d.H, d.K, d.H)),
                    ),
                )
            ]
            if bias
            else []
        ),
        Rule(t + "self_attention.dense.weight", (d.D, d.N * d.H), (("layers/o", MergeHeadsOut(d.N, d.H)),)),
        Rule(t + "post_attention_layernorm.weight", (d.D,), (("layers/mlp_norm", Same()),)),
        Rule(
            t + "mlp.dense_h_to_4h.weight",
            (2 * d.F, d.D),
            (("layers/gate", Transpose(0, d.F)), ("layers/up", Transpose(d.F, d.F))),
        ),
        Rule(t + "mlp.dense_4h_to_h.weight", (d.D, d.F), (("layers/down", Transpose(0, d.D)),)),
        Rule("transformer.encoder.final_layernorm.weight", (d.D,), (("final_norm", Same()),)),
        Rule("transformer.output_layer.weight", (d.V, d.D), (("lm_head", Transpose(0, d.V)),)),
        # RoPE frequencies of half of each head: a buffer, recomputed by the model from the config.
        Rule("transformer.rotary_pos_emb.inv_freq", (d.H // 4,), ()),
    ]


def hf_rules(d: Dims, bias: bool) -> list[Rule]:
    """The transformers layout (model_type "glm", GlmForCausalLM)."""
    m = "model.layers.{i}."
    proj = {"q": d.N, "k": d.K, "v": d.K}  # heads of each projection
    return [
        Rule("model.embed_tokens.weight", (d.V, d.D), (("embed", Same()),)),
        Rule(m + "input_layernorm.weight", (d.D,), (("layers/attn_norm", Same()),)),
        *[
            Rule(m + f"self_attn.{x}_proj.weight", (n * d.H, d.D), ((f"layers/{x}", SplitHeads(0, n, d.H)),))
            for x, n in proj.items()
        ],
        *[
            Rule(m + f"self_attn.{x}_proj.bias", (n * d.H,), ((f"layers/{x}_bias", SplitHeadsBias(0, n, d.H)),))
            for x, n in proj.items()
            if bias
        ],
        Rule(m + "self_attn.o_proj.weight", (d.D, d.N * d.H), (("layers/o", MergeHeadsOut(d.N, d.H)),)),
        Rule(m + "post_attention_layernorm.weight", (d.D,), (("layers/mlp_norm", Same()),)),
        Rule(
            m + "mlp.gate_up_proj.weight",
            (2 * d.F, d.D),
            (("layers/gate", Transpose(0, d.F)), ("layers/up", Transpose(d.F, d.F))),
        ),
        Rule(m + "mlp.down_proj.weight", (d.D, d.F), (("layers/down", Transpose(0, d.D)),)),
        Rule("model.norm.weight", (d.D,), (("final_norm", Same()),)),
        Rule("lm_head.weight", (d.V, d.D), (("lm_head", Transpose(0, d.V)),)),
    ]


def glm4_rules(d: Dims, bias: bool) -> list[Rule]:
    """The GLM-4-0414 layout (model_type "glm4", Glm4ForCausalLM): the transformers layout plus the RMSNorms on
    the attention and MLP outputs."""
    m = "model.layers.{i}."
    return [
        *hf_rules(d, bias),
        Rule(m + "post_self_attn_layernorm.weight", (d.D,), (("layers/post_attn_norm", Same()),)),
        Rule(m + "post_mlp_layernorm.weight", (d.D,), (("layers/post_mlp_norm", Same()),)),
    ]


LAYOUTS = {
    "chatglm": ("THUDM", thudm_rules),
    "glm": ("transformers", hf_rules),
    "glm4": ("transformers Glm4ForCausalLM", glm4_rules),
}


# ---- the mapping ----------------------------------------------------------------------------------------------------


class Destination(ArraySource):
    """One array of our tree, built on demand from source blocks. Stacked arrays ([L, ...]) have one source
    tensor per layer; the others have one."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, stacked: bool, on_read=None):
        self.path = path
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.stacked = stacked
        self.parts: dict[int, tuple[TensorInfo, object]] = {}  # layer (0 when not stacked) -> (source, transform)
        self.on_read = on_read  # called with (source TensorInfo, number of its elements read)
        self.allow_nonfinite = False  # True: NaN and Inf in the source pass through unchecked

    def read_into(self, region, out):
        if not self.stacked:
            self._fill(0, region, out)
        else:
            for j, layer in enumerate(range(region[0].start, region[0].stop)):
                self._fill(layer, region[1:], out[j])

    def position(self, region):
        """(file, offset) of the source tensor a region comes from: a cold page cache then reads each file in
        order, as the read-ahead hint of the converter does."""
        info, _ = self.parts[region[0].start if self.stacked else 0]
        return (str(info.path), info.offset)

    def copy_into(self, region, fd):
        """An in-kernel copy of a region that a source tensor holds as it is (same dtype, whole rows)."""
        if self.stacked:
            if region[0].stop - region[0].start != 1:
                return False
            layer, region = region[0].start, region[1:]
        else:
            layer = 0
        info, transform = self.parts[layer]
        if not isinstance(transform, Same) or info.dtype != self.dtype or not self.allow_nonfinite:
            return False  # (the values are checked on the way through memory unless NaN and Inf are allowed)
        if any((r.start, r.stop) != (0, n) for r, n in zip(region[1:], info.shape[1:], strict=True)):
            return False
        offset, nbytes = rows_range(info, region[0])
        if not copy_range(info.path, offset, nbytes, fd):
            return False
        if self.on_read is not None:
            self.on_read(info, nbytes // info.dtype.itemsize)
        return True

    def _fill(self, layer: int, region, out: np.ndarray) -> None:
        info, transform = self.parts[layer]
        transform.fill(_Reader(info, self.on_read, None if self.allow_nonfinite else self.dtype), region, out)


class _Reader:
    """Reads blocks of one source tensor for a transform: `read(rows, cols, into=None)`; `read.dtype`."""

    def __init__(self, info: TensorInfo, on_read, check: np.dtype | None = None):
        self.info, self.dtype, self.on_read, self.check = info, info.dtype, on_read, check

    def __call__(self, rows: slice, cols: slice | None, into: np.ndarray | None = None) -> np.ndarray:
        block = read_block(self.info, rows, cols, into=into)
        if self.check is not None:
            check_values(self.info, block, rows.start, 0 if cols is None else cols.start, self.check)
        if self.on_read is not None:
            self.on_read(self.info, block.size)
        return block


FLOAT16_OVERFLOW = 65520.0  # the smallest magnitude that float16 rounds to infinity


def check_values(info: TensorInfo, block: np.ndarray, row0: int, col0: int, target: np.dtype) -> None:
    """Refuses a source block holding NaN or Inf, or a value that overflows `target` (float16) when cast: names the
    tensor, its file and the first such index (in the tensor's coordinates)."""
    if block.dtype.kind in "iub":
        return
    finite = np.isfinite(block)
    bad = None if finite.all() else ~finite
    what = "a non-finite value"
    hint = "use --allow-nonfinite to convert it as it is"
    if bad is None and np.dtype(target) == np.float16 and block.dtype != np.float16:
        big = np.abs(block.astype(np.float32)) >= FLOAT16_OVERFLOW
        if big.any():
            bad, what, hint = big, "a value beyond the float16 range (65504)", "use --dtype bfloat16 or float32"
    if bad is None:
        return
    first = np.unravel_index(int(np.argmax(bad.reshape(-1))), block.shape)
    index = [int(i) for i in first]
    value = block[tuple(first)]
    index[0] += row0
    if len(index) == 2:
        index[1] += col0
    raise ConvertError(f"{info.origin}: tensor {info.name} has {what} ({value}) at index {index}; {hint}")


def _patterns(rules: list[Rule]):
    out = []
    for rule in rules:
        regex = re.escape(rule.source).replace(re.escape("{i}"), r"(0|[1-9][0-9]*)")
        out.append((re.compile(regex + r"\Z"), rule))
    return out


def map_tensors(cfg: Config, layout: str, tensors: dict[str, TensorInfo]) -> tuple[dict, list[TensorInfo]]:
    """Maps every source tensor through the table of `layout` ("chatglm" or "glm").

    Returns (tree of Destination arrays shaped like the model's parameters, the source tensors used). Raises
    ConvertError, naming the tensor and its file, for a tensor the table does not know (every tensor must be
    used exactly once or dropped on purpose), a tensor the model needs but the source lacks, or a shape that
    disagrees with the config.
    """
    layout_name, make_rules = LAYOUTS[layout]
    d = Dims.of(cfg)
    rules = make_rules(d, cfg.attention_bias)
    dtype = np_dtype(cfg.dtype)
    dests = {
        path: Destination(path, tuple(shape), dtype, stacked=path.startswith("layers/"))
        for path, (shape, _) in sorted(cfg.param_layout().items())
    }
    patterns = _patterns(rules)
    used = []
    for name in sorted(tensors):
        info = tensors[name]
        match = next(((m, rule) for regex, rule in patterns if (m := regex.match(name))), None)
        if match is None:
            raise ConvertError(f"{info.origin}: tensor {name} is not part of a {layout_name}-layout GLM-4 checkpoint")
        m, rule = match
        layer = int(m.group(1)) if m.groups() else 0
        if m.groups() and layer >= d.L:
            raise ConvertError(f"{info.origin}: tensor {name} is beyond the {d.L} layers of config.json")
        if info.shape != rule.shape:
            raise ConvertError(
                f"{info.origin}: tensor {name} has shape {list(info.shape)}, config.json implies {list(rule.shape)}"
            )
        if rule.outputs:
            used.append(info)
        for path, transform in rule.outputs:
            dest = dests[path]
            layer_shape = dest.shape[1:] if dest.stacked else dest.shape
            if transform.shape(info.shape) != layer_shape:  # a bug in the table, not bad input
                raise AssertionError(f"{name} -> {path}: {transform.shape(info.shape)} != {layer_shape}")
            if layer in dest.parts:
                raise ConvertError(f"{info.origin}: tensor {name} duplicates {dest.parts[layer][0].name}")
            dest.parts[layer] = (info, transform)
    for path, dest in dests.items():
        for layer in range(d.L) if dest.stacked else (0,):
            if layer not in dest.parts:
                source = next(r.source for r in rules if any(p == path for p, _ in r.outputs))
                raise ConvertError(f"missing tensor {source.format(i=layer)} (needed for {path})")
    return unflatten(dests.items()), used
