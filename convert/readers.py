"""Finding, checking and reading the tensors of a source checkpoint directory.

Supported: safetensors (one file, or shards with `model.safetensors.index.json`) and legacy PyTorch
`pytorch_model*.bin` shards (with or without `pytorch_model.bin.index.json`). Every file is checked before any
data is read: git-LFS pointers, truncated files, corrupt headers, an index that names a missing file or a tensor
its file lacks. `.bin` shards are turned into temporary safetensors files first (one shard in memory at a time,
loaded with `torch.load(..., weights_only=True)`), so that reading is the same afterwards.

Reading: a safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of each
tensor) and the raw little-endian tensor bytes. Once the header is checked, a block of rows of a tensor is one
`pread` at a known offset, straight into a buffer that is reused from block to block (bfloat16 is viewed as
`ml_dtypes.bfloat16`). Unlike memory-mapping the file, this keeps the resident memory at one block, and it
faults in no fresh pages. A block of some columns (rare: the chunking follows the source rows) is one pread per
row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
import threading

import ml_dtypes
import numpy as np

from glm4_jax.fileio import ScratchBuffer

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
LFS_MAGIC = b"version https://git-lfs.github.com/spec"

# safetensors dtype codes we accept (weights are floating point).
DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


class ConvertError(Exception):
    """Bad input for the converter. The message is one line and names the file or the tensor at fault."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    path: pathlib.Path  # the safetensors file holding it (a temporary one for a .bin source)
    dtype: np.dtype
    shape: tuple[int, ...]
    origin: str  # the file to name in messages (the .bin shard for a converted one)
    offset: int  # where its bytes start in `path`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ---- discovery --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceFiles:
    """The weight files of a source directory, before anything is read from them."""

    root: pathlib.Path
    kind: str  # "safetensors" or "bin"
    files: list[pathlib.Path]  # in a stable order
    index: pathlib.Path | None  # the index JSON, if any
    index_map: dict[str, str] | None  # tensor name -> file name, from the index

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_files(root: pathlib.Path) -> SourceFiles:
    """Lists the weight files of `root`, preferring safetensors to .bin, and checks the index against them."""
    for kind, index_name, pattern in (
        ("safetensors", SAFE_INDEX, "*.safetensors"),
        ("bin", BIN_INDEX, "pytorch_model*.bin"),
    ):
        index = root / index_name
        if index.exists():
            index_map = _read_index(index)
            names = sorted(set(index_map.values()))
            for name in names:
                if not (root / name).is_file():
                    raise ConvertError(f"{root / name}: listed in {index.name} but missing")
            return SourceFiles(root, kind, [root / n for n in names], index, index_map)
        files = sorted(p for p in root.glob(pattern) if p.is_file())
        if files:
            return SourceFiles(root, kind, files, None, None)
    raise ConvertError(f"{root}: no weights found (*.safetensors, pytorch_model*.bin or their index JSON)")


def _read_index(path: pathlib.Path) -> dict[str, str]:
    if _is_lfs_pointer(path):
        raise ConvertError(f"{path}: a git-LFS pointer, not the file itself (run `git lfs pull` in the source)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConvertError(f"{path}: not a text file, not a valid index") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ConvertError(f"{path}: no 'weight_map' object of tensor name -> file name")
    for name in set(weight_map.values()):
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ConvertError(f"{path}: file name {name!r} is not a plain file name")
    return weight_map


def _is_lfs_pointer(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LFS_MAGIC)) == LFS_MAGIC


# ---- safetensors ------------------------------------------------------------------------------------------------


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_header(path: pathlib.Path, origin: str | None = None) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, after checking that the file is complete and consistent."""
    origin = origin or str(path)
    size = path.stat().st_size
    if _is_lfs_pointer(path):
        raise ConvertError(f"{path}: a git-LFS pointer, not the weights (run `git lfs pull` in the source)")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ConvertError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConvertError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header")
    tensors, end, spans = {}, 0, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        fields = entry if isinstance(entry, dict) else {}
        code, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if not (
            isinstance(code, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
        ):
            raise ConvertError(
                f"{path}: corrupt safetensors header entry for {name}: needs a dtype string, a shape of sizes and "
                f"two integer data_offsets, has {_short(entry)}"
            )
        if code not in DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {code}; weights must be BF16, F16, F32 or F64")
        dtype, shape, (begin, stop) = DTYPES[code], tuple(shape), offsets
        if stop - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ConvertError(
                f"{path}: corrupt safetensors header: {name} {code}{_short(list(shape))} at [{begin}, {stop})"
            )
        end = max(end, stop)
        spans.append((begin, stop, name))
        tensors[name] = TensorInfo(name, path, dtype, shape, origin, 8 + n + begin)
    spans.sort()
    for (_, stop, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < stop:
            raise ConvertError(f"{path}: corrupt safetensors header: the data of {first} and {second} overlap")
    if 8 + n + end > size:
        raise ConvertError(f"{path}: truncated: the header needs {8 + n + end} bytes, the file has {size}")
    return tensors


_scratch = ScratchBuffer(min_bytes=1 << 20)  # source blocks (the writer fills its chunks from them)


def rows_range(info: TensorInfo, rows: slice) -> tuple[int, int]:
    """(offset in the file, bytes) of `tensor[rows]`: whole rows are one contiguous byte range."""
    row = math.prod(info.shape[1:]) * info.dtype.itemsize
    return info.offset + rows.start * row, (rows.stop - rows.start) * row


def _pread(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise ConvertError(f"{info.origin}: unexpected end of file while reading {info.name}")
        view, offset = view[n:], offset + n


def read_block(info: TensorInfo, rows: slice, cols: slice | None = None, *, into: np.ndarray | None = None):
    """`tensor[rows]` (1-D) or `tensor[rows, cols]` (2-D; cols None for all of them), read from disk.

    Read into `into` when given (C-contiguous, the tensor's dtype, the block's size); otherwise into this
    thread's scratch buffer, which the next call overwrites: use the block before reading another.
    """
    shape, isz = info.shape, info.dtype.itemsize
    row = int(np.prod(shape[1:], dtype=np.int64))  # elements per row
    nrows = rows.stop - rows.start
    if len(shape) == 2 and cols is not None and (cols.start, cols.stop) == (0, shape[1]):
        cols = None
    width = row if cols is None else cols.stop - cols.start
    nbytes = nrows * width * isz
    if into is not None:
        assert into.flags.c_contiguous and into.dtype == info.dtype and into.nbytes == nbytes
        buf = into.reshape(-1).view(np.uint8)
    else:
        buf = _scratch.get(nbytes)
    view = memoryview(buf)
    with open(info.path, "rb", buffering=0) as f:
        start, _ = rows_range(info, rows)
        if cols is None:
            _pread(f.fileno(), view, start, info)
        else:
            step = width * isz
            for r in range(nrows):
                _pread(f.fileno(), view[r * step : (r + 1) * step], start + (r * row + cols.start) * isz, info)
    return buf.view(info.dtype).reshape((nrows, *shape[1:]) if cols is None else (nrows, width))


# ---- legacy .bin --------------------------------------------------------------------------------------------------


def bin_to_safetensors(path: pathlib.Path, out: pathlib.Path) -> None:
    """Rewrites one PyTorch .bin shard as a safetensors file (only tensors; nothing is executed)."""
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"{path}: reading PyTorch .bin checkpoints needs torch (pip install torch), which is not installed"
        ) from None
    import safetensors.numpy

    if _is_lfs_pointer(path):
        raise ConvertError(f"{path}: a git-LFS pointer, not the weights (run `git lfs pull` in the source)")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) serialization
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({msg})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: not a flat dict of tensors")
    arrays = {}
    for name, t in state.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            arrays[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif t.dtype in (torch.float16, torch.float32, torch.float64):
            arrays[name] = t.numpy()
        else:
            raise ConvertError(f"{path}: tensor {name} has dtype {t.dtype}; weights must be floating point")
    safetensors.numpy.save_file(arrays, str(out))


def readahead(paths: list[pathlib.Path]) -> None:
    """Asks the kernel to read the files into the page cache in the background, in file order. The converter reads
    blocks in the order of the destination arrays, scattered over the files; on a cold cache this hint makes the
    disk read sequentially instead (about 20% faster here). A hint only: ignored where unsupported."""

    def run():
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                return

    threading.Thread(target=run, name="readahead", daemon=True).start()


# ---- hashing ----------------------------------------------------------------------------------------------------


def sha256(path: pathlib.Path, block: int = 8 << 20, stop=None) -> str | None:
    """Hex sha256 of a file; None if the `stop` event is set before the end."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                return None
            h.update(view[:n])
    return h.hexdigest()
