"""Weight quantization in numpy: int8 per output channel and int4 in groups, each never worse than absmax.

Used where no JAX runs (the converter) and where arrays are on the host (quantizing a checkpoint while loading it);
the model's matmuls on quantized weights are in glm4_jax/qmatmul.py. The stored layout of every array (shapes,
dtypes, logical axes) is `Config.stored_layout()`.

A matrix `w` has contracted (input) axes, `QUANTIZED[path]` in glm4_jax/config.py, and output axes (the rest, the
stacked layer axis included):

* int8: `scale` holds one value per output (the contracted axes reduced away), `absmax / 127`; values
  `round(w / scale)` in [-127, 127] as int8 (plain absmax).
* int4: one scale per group of `group` consecutive entries along the last contracted axis (its length divided by
  `group`), values in [-8, 7] stored two per byte along that axis: entry 2i in the low nibble, 2i+1 in the high
  one, each as a 4-bit two's complement (uint8).

Both are symmetric about zero (no offset). An int4 group's scale is the one of two candidates with the smaller
squared error, each computed with the scale rounded to the dtype it is stored in:

* plain absmax, `absmax / 7`: the largest entry on the top level, every entry within half a step (the reference
  that the quality target compares against; `search=False`);
* where the largest entry is negative, `absmax / 8`: it lands on the bottom level of two's complement, -8, and
  the step is finer by 1/7. Taken only where no entry errs by more than absmax's half step (a positive entry near
  absmax is clipped to 7).

So per group the squared error is never above plain absmax's, the largest error never above its rounding bound,
and the largest entry is represented as exactly as absmax represents it. At int8 the same level, -128, would make
the step finer by 1/127 only: measured in the quality benchmark its KL and top-1 moved both ways by noise-sized
amounts, so int8 stays plain absmax.

Why not clip (a scale below absmax / qmax, as a search minimizing squared weight error picks): when the largest
entry of a group is an outlier input channel (one input large in every output row, as real checkpoints have), the
clipping error lands on that one input in every output: coherent across outputs and proportional to that input,
it dominates the positions where that input is large. Measured on a random model with outlier columns
(BENCHMARKS.md), a clipping search lowered the mean KL but raised the worst position's KL above plain absmax's,
even when each clipped error was bounded by absmax's half step; these two candidates never clip the largest entry.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from glm4_jax.config import QUANTIZED, np_dtype
from glm4_jax.fileio import ArraySource
from glm4_jax.paths import flatten, unflatten

QMAX = {"int8": 127, "int4": 7}
SEARCH = True  # the default of `search`: False makes every scale plain absmax (the quality benchmark's reference)


def _grouped(w: np.ndarray, axis: int, group: int) -> np.ndarray:
    """w with `axis` (length n) split into (n // group, group): the group entries on a new axis `axis + 1`."""
    shape = w.shape[:axis] + (w.shape[axis] // group, group) + w.shape[axis + 1 :]
    return w.reshape(shape)


def _blocks(w: np.ndarray, contracted: tuple[int, ...], scheme: str, group: int):
    """(w with each int4 group on an axis of its own, the axes one scale reduces)."""
    if scheme == "int8":
        return w, tuple(contracted)
    last = contracted[-1]
    return _grouped(w, last, group), (last + 1,)


def search_scale(
    w: np.ndarray,
    contracted: tuple[int, ...],
    scheme: str,
    group: int,
    *,
    scale_dtype=np.float32,
    search: bool | None = None,
) -> np.ndarray:
    """The scales (stored layout, `scale_dtype`) of the float array `w` whose input axes are `contracted`: of the
    module docstring's two candidates the better (`search=False`: plain absmax; None: SEARCH)."""
    qmax = QMAX[scheme]
    blocks, reduce = _blocks(np.asarray(w, np.float32), contracted, scheme, group)
    amax = np.max(np.abs(blocks), axis=reduce, keepdims=True)
    negative = -np.min(blocks, axis=reduce, keepdims=True) >= amax  # the largest entry is negative

    def candidate(levels):
        scale = (amax / np.float32(levels)).astype(scale_dtype).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))  # an all-zero channel: any scale gives zeros
        diff = np.clip(np.rint(blocks / scale), -qmax - 1, qmax) * scale - blocks
        return (
            scale,
            np.sum(np.square(diff), axis=reduce, keepdims=True),
            np.max(np.abs(diff), axis=reduce, keepdims=True),
        )

    scale, err, _ = candidate(qmax)
    if scheme == "int4" and (SEARCH if search is None else search):
        finer, finer_err, finer_max = candidate(qmax + 1)
        better = negative & (finer_err < err) & (finer_max <= scale / 2)
        scale = np.where(better, finer, scale)
    return np.squeeze(scale, axis=reduce).astype(scale_dtype)


def quantize_with(w: np.ndarray, scale: np.ndarray, contracted: tuple[int, ...], scheme: str, group: int):
    """The stored values of the float array `w` with the scales `scale` (stored layout): for int8, `w` may hold
    any rows of the contracted axes (each output's scale applies to all of them); for int4, whole groups."""
    qmax = QMAX[scheme]
    w = np.asarray(w, np.float32)
    blocks, reduce = _blocks(w, contracted, scheme, group)
    scale = np.expand_dims(np.asarray(scale).astype(np.float32), reduce)
    q = np.clip(np.rint(blocks / scale), -qmax - 1, qmax).astype(np.int8)
    if scheme == "int8":
        return q
    return pack_int4(q.reshape(w.shape), contracted[-1])


def quantize(
    w: np.ndarray, contracted: tuple[int, ...], scheme: str, group: int, **kw
) -> tuple[np.ndarray, np.ndarray]:
    """Quantizes the float array `w` whose input axes are `contracted`. Returns (values, scale) in the stored
    layout of glm4_jax/config.py `stored_layout`; `kw` (scale_dtype, search) as for `search_scale`."""
    scale = search_scale(w, contracted, scheme, group, **kw)
    return quantize_with(w, scale, contracted, scheme, group), scale


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


def _scale_box(dense_region: tuple[slice, ...], contracted: tuple[int, ...], scheme: str, group: int):
    """The scale entries (a region of the scale array) that the float entries `dense_region` use (int4: whole
    groups along the last contracted axis)."""
    if scheme == "int8":
        return tuple(r for axis, r in enumerate(dense_region) if axis not in contracted)
    last = contracted[-1]
    r = dense_region[last]
    return dense_region[:last] + (slice(r.start // group, -(-r.stop // group)),) + dense_region[last + 1 :]


MISSING, BUSY, KNOWN = 0, 1, 2


class SharedScales:
    """The scales of one matrix, shared by the sources of its values and of its scales, so that the converter
    searches each scale once: the first chunk (of either array) whose entries need a scale claims it, searches it
    and records it; later chunks wait for a claimed scale and use a recorded one (values: only the rounding).
    A chunk waits only while it holds no claim, and a claim ends (recorded, or released on an error) within its
    own chunk, so no chunk waits on one that is not running. Held from the first chunk to the last (`read` counts
    the entries written), then freed."""

    def __init__(self, shape, dtype, entries: int):
        self.shape, self.dtype, self.left = tuple(shape), np.dtype(dtype), entries
        self.scale = self.state = None
        self.cond = threading.Condition()

    def claim(self, box) -> np.ndarray:
        """Waits until no scale of `box` is being searched, then claims the missing ones (the returned mask)."""
        with self.cond:
            if self.state is None:
                self.scale, self.state = np.empty(self.shape, self.dtype), np.full(self.shape, MISSING, np.int8)
            while np.any(self.state[box] == BUSY):
                self.cond.wait()
            state = self.state[box]
            missing = state == MISSING
            state[missing] = BUSY
            return missing

    def record(self, box, mask, scale) -> None:
        with self.cond:
            self.scale[box][mask] = scale[mask]
            self.state[box][mask] = KNOWN
            self.cond.notify_all()

    def release(self, box, mask) -> None:
        """Gives claimed scales that were not recorded back (an error in their chunk)."""
        with self.cond:
            if self.state is not None:
                state = self.state[box]
                state[mask & (state == BUSY)] = MISSING
                self.cond.notify_all()

    def get(self, box) -> np.ndarray:
        with self.cond:
            return self.scale[box].copy()

    def read(self, entries: int) -> None:
        with self.cond:
            self.left -= entries
            if self.left == 0:
                self.scale = self.state = None


class QuantizedSource(ArraySource):
    """The stored values (`part="values"`) or scales (`part="scale"`) of one quantized matrix, computed chunk by
    chunk from `dense`, the ArraySource of the float matrix, with the SharedScales `scales` of the matrix. A chunk
    whose scales are all recorded reads just the float entries it stands for (int4: whole groups) and, for values,
    rounds them; otherwise it claims the missing scales, reads the float block they are computed from (whole
    contracted axes for int8, whole groups for int4), searches them and records them."""

    def __init__(self, dense: ArraySource, part: str, contracted, scheme: str, group: int, shape, dtype, scales):
        self.dense, self.part, self.contracted, self.scheme, self.group = dense, part, contracted, scheme, group
        self.shape, self.dtype, self.scales = tuple(shape), np.dtype(dtype), scales

    def _dense_region(self, region):
        """The float entries the chunk `region` stands for, and the float block its scales are searched on."""
        args = self.contracted, self.scheme, self.group
        if self.part == "scale":
            block = _concrete(scale_region(region, *args), self.dense.shape)
            return block, block
        own = list(_concrete(values_region(region, *args), self.dense.shape))
        if self.scheme == "int8":  # a chunk of some rows: the rows themselves, with the scales of whole columns
            own = [region[axis] if axis in self.contracted else r for axis, r in enumerate(own)]
            own = list(_concrete(tuple(own), self.dense.shape))
        return tuple(own), _concrete(values_region(region, *args), self.dense.shape)

    def _read(self, src):
        block = np.empty(tuple(r.stop - r.start for r in src), self.dense.dtype)
        self.dense.read_into(src, block)
        return block

    def _search(self, block, claimed):
        """The scales of `block` (a float block of whole channels or groups) at the entries `claimed` of its scale
        box, searched on those channels or groups alone (a chunk cut otherwise may have searched the rest)."""
        if self.scheme == "int8":
            k = len(self.contracted)
            rows = np.moveaxis(block, self.contracted, range(k)).reshape(
                math.prod(block.shape[a] for a in self.contracted), -1
            )
            picked, contracted = rows[:, claimed.reshape(-1)], (0,)
        else:
            last = self.contracted[-1]
            groups = np.moveaxis(_grouped(block, last, self.group), last + 1, -1).reshape(-1, self.group)
            picked, contracted = groups[claimed.reshape(-1)].T, (0,)
        scale = np.empty(claimed.shape, self.scales.dtype)
        scale[claimed] = search_scale(
            picked, contracted, self.scheme, self.group, scale_dtype=self.scales.dtype
        ).reshape(-1)
        return scale

    def read_into(self, region, out):
        own, full = self._dense_region(region)
        box = _concrete(_scale_box(own, self.contracted, self.scheme, self.group), self.scales.shape)
        claimed = self.scales.claim(box)
        try:
            if claimed.any():
                block = self._read(full)
                self.scales.record(box, claimed, self._search(block, claimed))
                if own != full:
                    block = block[
                        tuple(slice(o.start - f.start, o.stop - f.start) for o, f in zip(own, full, strict=True))
                    ]
            else:
                block = self._read(own) if self.part == "values" else None
        finally:
            self.scales.release(box, claimed)
        scale = self.scales.get(box)
        if self.part == "scale":
            out[...] = scale
        else:
            values = quantize_with(block, scale, self.contracted, self.scheme, self.group)
            # The stored entries of `region` within the block's values.
            inner = []
            for axis, (r, s) in enumerate(zip(region, own, strict=True)):
                pairs = self.scheme == "int4" and axis == self.contracted[-1]
                offset = s.start // 2 if pairs else s.start  # int4: the block's pairs start at float entry s.start
                inner.append(slice(r.start - offset, r.stop - offset))
            out[...] = values[tuple(inner)]
        self.scales.read(out.size)

    def position(self, region):
        return self.dense.position(self._dense_region(region)[1])


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
        values_shape, scale_shape = stored[name][0], stored[name + "_scale"][0]
        scales = SharedScales(scale_shape, np_dtype(cfg.dtype), math.prod(values_shape) + math.prod(scale_shape))
        for part, path in (("values", name), ("scale", name + "_scale")):
            shape, _, dtype = stored[path]
            q = QuantizedSource(source, part, contracted, cfg.quant, cfg.group_size, shape, np_dtype(dtype), scales)
            out.append((path, q))
    return unflatten(out)
