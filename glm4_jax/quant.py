"""Weight quantization in numpy: int8 per output channel and int4 in groups, with a clipping search.

Used where no JAX runs (the converter) and where arrays are on the host (quantizing a checkpoint while loading it);
the model's matmuls on quantized weights are in glm4_jax/qmatmul.py. The stored layout of every array (shapes,
dtypes, logical axes) is `Config.stored_layout()`.

A matrix `w` has contracted (input) axes, `QUANTIZED[path]` in glm4_jax/config.py, and output axes (the rest, the
stacked layer axis included):

* int8: `scale` holds one value per output (the contracted axes reduced away), values `round(w / scale)` in
  [-127, 127] as int8.
* int4: one scale per group of `group` consecutive entries along the last contracted axis (its length divided by
  `group`), values in [-7, 7] stored two per byte along that axis: entry 2i in the low nibble, 2i+1 in the high
  one, each as a 4-bit two's complement (uint8).

Both are symmetric. A scale is `r * absmax / qmax` with the clipping ratio r of CLIP_RATIOS that gives the smallest
squared error of its channel or group, computed with the scale rounded to the dtype it is stored in; r = 1 is
plain absmax quantization (`clip=False`), so the search is never worse than absmax on the weights it is given.
"""

from __future__ import annotations

import numpy as np

from glm4_jax.config import QUANTIZED, np_dtype
from glm4_jax.fileio import ArraySource
from glm4_jax.paths import flatten, unflatten

QMAX = {"int8": 127, "int4": 7}
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _grouped(w: np.ndarray, axis: int, group: int) -> np.ndarray:
    """w with `axis` (length n) split into (n // group, group): the group entries on a new axis `axis + 1`."""
    shape = w.shape[:axis] + (w.shape[axis] // group, group) + w.shape[axis + 1 :]
    return w.reshape(shape)


def quantize(
    w: np.ndarray,
    contracted: tuple[int, ...],
    scheme: str,
    group: int,
    *,
    scale_dtype=np.float32,
    clip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantizes the float array `w` whose input axes are `contracted`. Returns (values, scale) in the stored
    layout of glm4_jax/config.py `stored_layout` (scale in `scale_dtype`). `clip=False`: plain absmax."""
    w = np.asarray(w, np.float32)
    qmax = QMAX[scheme]
    if scheme == "int8":
        blocks, reduce = w, tuple(contracted)
    else:
        last = contracted[-1]
        blocks, reduce = _grouped(w, last, group), (last + 1,)
    amax = np.max(np.abs(blocks), axis=reduce, keepdims=True)
    best_scale = best_err = None
    for r in CLIP_RATIOS if clip else (1.0,):
        scale = (amax * (r / qmax)).astype(scale_dtype).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))  # an all-zero channel: any scale gives zeros
        q = np.clip(np.rint(blocks / scale), -qmax, qmax)
        err = np.sum(np.square(q * scale - blocks), axis=reduce, keepdims=True)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.minimum(err, best_err)
    q = np.clip(np.rint(blocks / best_scale), -qmax, qmax).astype(np.int8)
    scale = np.squeeze(best_scale, axis=reduce).astype(scale_dtype)
    if scheme == "int8":
        return q, scale
    return pack_int4(q.reshape(w.shape), contracted[-1]), scale


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
    """int8 values in [-8, 7] -> uint8, two per byte along `axis` (even index low nibble, odd index high)."""
    q = np.moveaxis(q.astype(np.int8), axis, -1)
    lo, hi = q[..., 0::2], q[..., 1::2]
    packed = (lo.view(np.uint8) & 0x0F) | ((hi.view(np.uint8) & 0x0F) << 4)
    return np.moveaxis(packed.astype(np.uint8), -1, axis)


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of `pack_int4`: int8 values, `axis` twice as long."""
    p = np.moveaxis(np.asarray(packed, np.uint8), axis, -1).view(np.int8)
    lo = np.left_shift(p, 4) >> 4  # arithmetic shifts sign-extend the nibbles
    hi = p >> 4
    q = np.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return np.moveaxis(q, -1, axis)


def dequantize(values: np.ndarray, scale: np.ndarray, contracted: tuple[int, ...], scheme: str, group: int):
    """The float32 array that `values` and `scale` stand for."""
    scale = np.asarray(scale, np.float32)
    if scheme == "int8":
        return values.astype(np.float32) * np.expand_dims(scale, tuple(contracted))
    last = contracted[-1]
    q = unpack_int4(values, last).astype(np.float32)
    return (_grouped(q, last, group) * np.expand_dims(scale, last + 1)).reshape(q.shape)


def scale_region(region: tuple[slice, ...], contracted: tuple[int, ...], scheme: str, group: int):
    """The region of the float matrix that the scale entries `region` (of the scale array) are computed from."""
    if scheme == "int8":
        out = list(region)
        for axis in contracted:
            out.insert(axis, slice(None))
        return tuple(out)
    last = contracted[-1]
    r = region[last]
    return region[:last] + (slice(r.start * group, r.stop * group),) + region[last + 1 :]


def values_region(region: tuple[slice, ...], contracted: tuple[int, ...], scheme: str, group: int):
    """The region of the float matrix that the stored values `region` are computed from: the whole contracted axes
    (int8) or whole groups (int4, whose stored axis is half as long)."""
    out = list(region)
    if scheme == "int8":
        for axis in contracted:
            out[axis] = slice(None)
        return tuple(out)
    last = contracted[-1]
    r = region[last]
    start, stop = 2 * r.start, 2 * r.stop  # float entries of the stored pairs
    out[last] = slice(start // group * group, -(-stop // group) * group)
    return tuple(out)


# ---- sources for the checkpoint writer (the converter quantizes chunk by chunk) --------------------------------


def _concrete(region: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, shape, strict=True))


class QuantizedSource(ArraySource):
    """The stored values (`part="values"`) or scales (`part="scale"`) of one quantized matrix, computed chunk by
    chunk from `dense`, the ArraySource of the float matrix: each chunk reads the float block its entries depend
    on (whole contracted axes for int8, whole groups for int4) and quantizes it."""

    def __init__(self, dense: ArraySource, part: str, contracted, scheme: str, group: int, shape, dtype, scale_dtype):
        self.dense, self.part, self.contracted, self.scheme, self.group = dense, part, contracted, scheme, group
        self.shape, self.dtype, self.scale_dtype = tuple(shape), np.dtype(dtype), np.dtype(scale_dtype)

    def _dense_region(self, region):
        if self.part == "scale":
            return _concrete(scale_region(region, self.contracted, self.scheme, self.group), self.dense.shape)
        return _concrete(values_region(region, self.contracted, self.scheme, self.group), self.dense.shape)

    def read_into(self, region, out):
        src = self._dense_region(region)
        block = np.empty(tuple(r.stop - r.start for r in src), self.dense.dtype)
        self.dense.read_into(src, block)
        values, scale = quantize(block, self.contracted, self.scheme, self.group, scale_dtype=self.scale_dtype)
        if self.part == "scale":
            out[...] = scale
            return
        # The stored entries of `region` within the block's values.
        inner = []
        for axis, (r, s) in enumerate(zip(region, src, strict=True)):
            pairs = self.scheme == "int4" and axis == self.contracted[-1]
            offset = s.start // 2 if pairs else s.start  # int4: the block's pairs start at float entry s.start
            inner.append(slice(r.start - offset, r.stop - offset))
        out[...] = values[tuple(inner)]

    def position(self, region):
        return self.dense.position(self._dense_region(region))


def quantized_sources(dense: dict, cfg) -> dict:
    """The nested dict of sources of `cfg.stored_layout()` (cfg.quant set) from `dense`, the nested dict of the
    float parameters' sources (`cfg.param_layout()`): matrices become their values and scales, the rest stays."""
    stored = cfg.stored_layout()
    out = []
    for name, source in flatten(dense):
        contracted = QUANTIZED.get(name)
        if contracted is None:
            out.append((name, source))
            continue
        for part, path in (("values", name), ("scale", name + "_scale")):
            shape, _, dtype = stored[path]
            q = QuantizedSource(
                source, part, contracted, cfg.quant, cfg.group_size, shape, np_dtype(dtype), np_dtype(cfg.dtype)
            )
            out.append((path, q))
    return unflatten(out)
