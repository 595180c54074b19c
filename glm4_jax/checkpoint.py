"""Converted checkpoints: write them chunk by chunk, check them, restore them straight into shardings.

A converted checkpoint is a directory (docs/DESIGN.md):

    config.json          normalized Config (model_type "glm4_jax")
    manifest.json        format, versions, parameter list, source files; written last, so it marks completion
    params/              Orbax PyTree checkpoint (zarr v3 arrays, no OCDBT) of the parameters of `glm4_jax.model.GLM4`
    tokenizer.model ...  copied by the converter when the source has them

Writing goes through `write_params`, which takes a tree of `ArraySource`s (a `shape`, a `dtype` and
`read_into(region, out)`) and writes each array one storage chunk (at most 30 MiB) at a time, a few threads at
once: a converter produces the chunks on demand from the source files, and its memory does not grow with the
model. The bytes go straight to the chunk files (see "writing" below), so writing needs neither JAX nor Orbax;
restoring uses Orbax's own handlers, and this is the only module that calls Orbax. Everything is written into a
temporary sibling that is fsync'ed and renamed at the end (`staging_dir`). `save` writes an in-memory model the
same way; `load` restores one straight into its target shardings.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import pathlib
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from glm4_jax.config import DEFAULT_GROUP_SIZE, DTYPES, FUSED, QUANTIZED, Config, ConfigError, np_dtype
from glm4_jax.fileio import ArraySource, NumpySource, ScratchBuffer, crc32c, staging_dir, write_all
from glm4_jax.paths import flatten, unflatten

FORMAT = "glm4-jax-checkpoint"
FORMAT_VERSION = 2  # 2: chunks carry a crc32c, arrays and manifest a conversion id; 1 is still read
CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
CRC_BYTES = 4  # the crc32c codec appends the checksum of the chunk's bytes, little-endian
PARAMS_DIR = "params"
MANIFEST = "manifest.json"
CONFIG = "config.json"

CHUNK_BYTES = 30 << 20  # the most bytes in one storage chunk: the unit of writing, and of reading back
WRITERS = max(2, min(8, os.cpu_count() or 2))  # threads filling and writing chunks, one chunk each at a time


class CheckpointError(ValueError):
    """A directory that is not a complete glm4-jax checkpoint, or one that does not match its config."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("glm4-jax")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def chunk_regions(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The regions of a regular chunk grid, in C order."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(corner, chunk, shape, strict=True))


# ---- writing ----------------------------------------------------------------------------------------------------
# The params/ directory is written here directly, without Orbax or TensorStore in the way of the bytes: each array
# is a zarr v3 array (zarr.json plus one file of raw little-endian bytes per chunk, no compression), and two small
# JSON files (_METADATA, _CHECKPOINT_METADATA) make the directory the Orbax PyTree checkpoint that
# `PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)` would have written. Orbax restores it with its own
# handlers (`load`), and tests/test_writer.py checks that it does. A chunk is then one write of a buffer the
# converter filled (or one copy_file_range), so writing costs one kernel copy per byte, no more.

# Logical axes split first when cutting an array into chunks: the ones a "tensor" mesh axis shards
# (sharding/rules.py), so that a host of a tensor-parallel layout reads little beyond its own slices.
SPLIT_FIRST = ("vocab", "q_heads", "kv_heads", "ffn")
ORBAX_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def chunk_shape(shape: tuple[int, ...], axes: tuple[str, ...], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """The storage chunk of an array: one layer of a stacked array (leading "layers" axis), cut along the
    tensor-parallel axes first, then the embed axis, then the largest, until it holds at most `max_bytes`. A cut
    prefers a piece that divides the dim (no padded edge chunk) when one of at least half the largest fitting
    piece exists."""
    chunk = list(shape)
    if axes and axes[0] == "layers":
        chunk[0] = min(1, shape[0])
    order = sorted(range(len(shape)), key=lambda i: (axes[i] not in SPLIT_FIRST, axes[i] != "embed", -shape[i]))
    for i in order:
        nbytes = math.prod(chunk) * itemsize
        if nbytes <= max_bytes or chunk[i] <= 1:
            continue
        per_unit = nbytes // chunk[i]
        most = max(1, max_bytes // per_unit)
        divisor = next((d for d in range(most, (most + 1) // 2 - 1, -1) if shape[i] % d == 0), None)
        chunk[i] = divisor or most
    return tuple(chunk)


def _zarr_metadata(shape, dtype: np.dtype, chunk, conversion_id: str) -> dict:
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,  # zarr v3 names bfloat16, float16 and float32 as numpy does
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0.0,
        "codecs": CODECS,
        "attributes": {"glm4_jax_conversion_id": conversion_id},  # ties the array to its manifest
    }


def _orbax_metadata(names: list[str]) -> tuple[dict, dict]:
    """(_METADATA, _CHECKPOINT_METADATA) of an Orbax PyTree checkpoint of numpy arrays at these '/'-joined paths."""
    tree = {
        str(tuple(name.split("/"))): {
            "key_metadata": [{"key": key, "key_type": 2} for key in name.split("/")],  # 2: a dict key
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
        for name in names
    }
    pytree = {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": True,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }
    now = time.time_ns()
    step = {
        "item_handlers": ORBAX_PYTREE_HANDLER,
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    return pytree, step


class _Chunk:
    """One storage chunk to write: the array it belongs to, its region, and its file."""

    __slots__ = ("source", "chunk", "region", "path")

    def __init__(self, source: ArraySource, chunk: tuple[int, ...], region: tuple[slice, ...], path: str):
        self.source, self.chunk, self.region, self.path = source, chunk, region, path


_chunk_buffer = ScratchBuffer()


def _write_chunk(job: _Chunk, cancelled: threading.Event) -> int:
    """Fills the chunk from its source and writes its file; returns the bytes of the array it covers."""
    if cancelled.is_set():
        return 0
    src, dtype = job.source, np.dtype(job.source.dtype)
    block = tuple(r.stop - r.start for r in job.region)
    fd = os.open(job.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        nbytes = math.prod(job.chunk) * dtype.itemsize
        full = _chunk_buffer.get(nbytes).view(dtype).reshape(job.chunk)
        if block == job.chunk and src.copy_into(job.region, fd):
            raw = memoryview(full.reshape(-1).view(np.uint8))  # read back (from the page cache) for the checksum
            if os.preadv(fd, [raw], 0) != nbytes:
                raise OSError(f"{job.path}: short read back")
            write_all(fd, memoryview(crc32c(raw).to_bytes(CRC_BYTES, "little")), job.path)
            return math.prod(block) * dtype.itemsize
        if block == job.chunk:
            src.read_into(job.region, full)
        else:  # an edge chunk: zarr stores it whole, padded with the fill value
            part = np.empty(block, dtype)
            src.read_into(job.region, part)
            full[...] = 0
            full[tuple(slice(0, n) for n in block)] = part
        raw = memoryview(full.reshape(-1).view(np.uint8))
        write_all(fd, raw, job.path)
        write_all(fd, memoryview(crc32c(raw).to_bytes(CRC_BYTES, "little")), job.path)
    finally:
        os.close(fd)
    return math.prod(block) * dtype.itemsize


def write_params(
    directory: str | os.PathLike,
    sources: dict,
    cfg: Config,
    *,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
    threads: int | None = None,
    conversion_id: str | None = None,
) -> str:
    """Writes a nested dict of `ArraySource`s, shaped like the parameters of `cfg`, as an Orbax checkpoint at
    `directory` (which must not exist).

    Each array is cut into chunks of at most `chunk_bytes` (see `chunk_shape`); `threads` threads each fill one
    chunk at a time from its source and write it, so at most `threads` chunks are in memory. `progress(nbytes)`
    is called after each chunk. Every chunk ends with its crc32c (zarr v3's codec, which TensorStore verifies on
    each read), and every zarr.json carries `conversion_id` (a new random one when None), which is returned for
    the manifest (`write_manifest`). Nothing is fsync'ed here: `staging_dir` syncs the whole tree before publishing
    it. On any error or KeyboardInterrupt the threads stop after the chunk they have under way before the
    exception propagates (an error from `read_into` propagates as it is), so the caller may delete the directory.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("writing checkpoints needs a little-endian host")
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    threads = threads or WRITERS
    directory = pathlib.Path(directory)
    conversion_id = conversion_id or uuid.uuid4().hex
    directory.mkdir()
    layout = cfg.stored_layout()
    arrays = flatten(sources)
    jobs = []
    for name, source in arrays:
        dtype = np.dtype(source.dtype)
        # A quantized array's chunk is computed from a float32 block of the same entries: size the chunk by that.
        work_itemsize = 4 if dtype.kind in "iu" else dtype.itemsize
        chunk = chunk_shape(tuple(source.shape), layout[name][1], work_itemsize, chunk_bytes)
        array_dir = directory / name.replace("/", ".")  # Orbax's name for a tree path without OCDBT
        array_dir.mkdir()
        (array_dir / "zarr.json").write_text(json.dumps(_zarr_metadata(source.shape, dtype, chunk, conversion_id)))
        for region in chunk_regions(tuple(source.shape), chunk):
            index = [r.start // c for r, c in zip(region, chunk, strict=True)]
            path = array_dir.joinpath("c", *map(str, index))
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append(_Chunk(source, chunk, region, str(path)))

    jobs.sort(key=lambda job: job.source.position(job.region))  # stable: tree order among equal keys
    cancelled = threading.Event()
    lock = threading.Lock()

    def work(job: _Chunk) -> None:
        try:
            nbytes = _write_chunk(job, cancelled)
        except BaseException:
            cancelled.set()  # the other threads stop after the chunk they have under way
            raise
        if progress is not None and nbytes:
            with lock:
                progress(nbytes)

    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-write")
    try:
        futures = [pool.submit(work, job) for job in jobs]
        pending = set(futures)
        while pending:  # in slices, so that a KeyboardInterrupt reaches this thread promptly
            done, pending = concurrent.futures.wait(pending, 0.1, concurrent.futures.FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise future.exception()
    except BaseException:
        cancelled.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    pytree, step = _orbax_metadata([name for name, _ in arrays])
    (directory / "_METADATA").write_text(json.dumps(pytree))
    (directory / "_CHECKPOINT_METADATA").write_text(json.dumps(step))
    return conversion_id


def write_manifest(
    directory: str | os.PathLike,
    cfg: Config,
    params: dict,
    *,
    source: dict | None = None,
    writer: str = "glm4_jax.checkpoint.save",
    conversion_id: str,
) -> None:
    """Writes manifest.json: the format, the versions, the conversion id of params/ (from `write_params`), every
    parameter's shape and dtype, and the source files."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "writer": writer,
        "converter_version": package_version(),
        "conversion_id": conversion_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": cfg.dtype,
        "quantization": None if cfg.quant is None else {"scheme": cfg.quant, "group_size": cfg.group_size},
        "params": {
            name: {"shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name} for name, leaf in flatten(params)
        },
        "source": source,
    }
    path = pathlib.Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def save(path: str | os.PathLike, model_or_params, cfg: Config, *, overwrite: bool = False) -> None:
    """Writes a GLM4 model (or its parameter dict, fused as the model holds it or in the stored layout) as a
    converted checkpoint at `path`, atomically. Fused arrays are written as their parts (`glm4_jax.model.split`)."""
    from flax import nnx

    if isinstance(model_or_params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    else:
        params = model_or_params
    if isinstance(params.get("layers"), dict) and "qkv" in params["layers"]:
        from glm4_jax.model import split_params

        params = unflatten(split_params(cfg, dict(flatten(params))).items())
    _check_tree(params, cfg, what="parameters given to save()")
    layout = cfg.stored_layout()
    params = unflatten((name, NumpySource(x, np_dtype(layout[name][2]))) for name, x in flatten(params))
    with staging_dir(path, overwrite=overwrite) as tmp:
        conversion_id = write_params(tmp / PARAMS_DIR, params, cfg)
        cfg.save(tmp / CONFIG)
        write_manifest(tmp, cfg, params, conversion_id=conversion_id)


# ---- checking and loading -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """The shape and dtype of one parameter (a leaf for jax.tree, like a ShapeDtypeStruct)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def expected_params(cfg: Config) -> dict:
    """The parameter tree of `GLM4(cfg)` as `ParamSpec`s, from `Config.stored_layout` (no JAX needed)."""
    return unflatten(
        (path, ParamSpec(shape, np_dtype(dtype))) for path, (shape, _, dtype) in cfg.stored_layout().items()
    )


def _check_tree(tree: dict, cfg: Config, *, what: str) -> None:
    want = {name: tuple(leaf.shape) for name, leaf in flatten(expected_params(cfg))}
    got = {name: tuple(leaf.shape) for name, leaf in flatten(tree)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{what}: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    for name, shape in want.items():
        if got[name] != shape:
            raise CheckpointError(f"{what}: {name} has shape {list(got[name])}, the config gives {list(shape)}")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint at `path`, after checking that it is one of ours and complete."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        if (path / "params").is_dir() or path.name.startswith("."):
            raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete (an interrupted write?)")
        raise CheckpointError(
            f"{path}: no {MANIFEST}; not a glm4-jax checkpoint (convert one with `python -m glm4_jax.convert`)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{mpath}: format {fmt!r} is not {FORMAT!r}; not a glm4-jax checkpoint")
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format version {version!r}; this glm4-jax ({package_version()}) reads up to {FORMAT_VERSION}"
        )
    if version >= 2 and not (isinstance(manifest.get("conversion_id"), str) and manifest["conversion_id"]):
        raise CheckpointError(f"{mpath}: conversion_id {manifest.get('conversion_id')!r} is not a string")
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: no {PARAMS_DIR}/ directory; the checkpoint is incomplete")
    return manifest


def check(path: str | os.PathLike) -> tuple[Config, dict]:
    """Checks the checkpoint at `path` against its config without reading any array data.

    Returns (config, manifest). Raises CheckpointError (or ConfigError for a bad config.json) with a message that
    names the file or the parameter at fault.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path)
    manifest = read_manifest(path)
    cfg = Config.from_file(path / CONFIG)
    want = {name: (tuple(a.shape), np.dtype(a.dtype).name) for name, a in flatten(expected_params(cfg))}
    try:
        listed = {name: (tuple(v["shape"]), v["dtype"]) for name, v in manifest.get("params", {}).items()}
    except (AttributeError, KeyError, TypeError):
        raise CheckpointError(f"{path / MANIFEST}: params is not a map of shape and dtype per parameter") from None
    if listed != want:
        diff = sorted(k for k in set(want) | set(listed) if want.get(k) != listed.get(k))
        raise CheckpointError(f"{path / MANIFEST}: parameters {diff} do not match {CONFIG}")
    if version_of(manifest) >= 2:  # each zarr.json as written, with the manifest's conversion id
        for name, (shape, dtype) in want.items():
            array_metadata(path, name, shape, dtype, manifest["conversion_id"])
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            stored = ckptr.metadata(path.absolute() / PARAMS_DIR).item_metadata.tree
    except Exception as e:  # Orbax raises many kinds; all mean the same to a user
        raise CheckpointError(f"{path / PARAMS_DIR}: unreadable Orbax metadata, incomplete checkpoint ({e})") from None
    have = {name: tuple(m.shape) for name, m in flatten(stored)}
    for name, (shape, _) in want.items():
        if have.get(name) != shape:
            raise CheckpointError(f"{path / PARAMS_DIR}: {name} is {have.get(name)}, expected {shape}")
    return cfg, manifest


def version_of(manifest: dict) -> int:
    return manifest["format_version"]


def array_metadata(path: pathlib.Path, name: str, shape: tuple[int, ...], dtype: str, conversion_id: str) -> dict:
    """The zarr.json of parameter `name`, after checking that it is exactly what `write_params` writes for this
    shape and dtype (little-endian bytes and a crc32c, no other codec, a regular chunk grid) and that it carries
    the manifest's conversion id: params/ from another conversion, or an edited zarr.json, are refused."""
    where = path / PARAMS_DIR / name.replace("/", ".") / "zarr.json"
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: unreadable array metadata of {name} ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: the array metadata of {name} is not a JSON object")
    attributes = meta.get("attributes")
    got_id = attributes.get("glm4_jax_conversion_id") if isinstance(attributes, dict) else None
    if got_id != conversion_id:
        raise CheckpointError(
            f"{where}: {name} belongs to conversion {got_id!r}, the manifest to {conversion_id!r}: params/ is not "
            "the one this manifest was written with (copied from another checkpoint?); convert again"
        )
    try:
        chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        ok_chunk = len(chunk) == len(shape) and all(type(c) is int and c > 0 for c in chunk)
    except (KeyError, TypeError):
        ok_chunk = False
    checks = (
        ("shape", meta.get("shape") == list(shape)),
        ("data_type", meta.get("data_type") == dtype),
        ("codecs", meta.get("codecs") == CODECS),
        ("chunk_grid", ok_chunk and meta["chunk_grid"].get("name") == "regular"),
        ("chunk_key_encoding", meta.get("chunk_key_encoding") == {"name": "default"}),
        ("fill_value", meta.get("fill_value") == 0.0),
    )
    for field, ok in checks:
        if not ok:
            raise CheckpointError(
                f"{where}: {name} has {field} {meta.get(field)!r}, not what glm4-jax writes for {dtype} "
                f"{list(shape)} (an edited zarr.json?)"
            )
    return meta


def _chunk_bytes(array_dir: pathlib.Path, name: str, index, nbytes: int, checksummed: bool) -> bytes:
    """The data bytes of one stored chunk, its crc32c checked when the array has one."""
    where = array_dir.joinpath("c", *map(str, index))
    want = nbytes + (CRC_BYTES if checksummed else 0)
    try:
        with open(where, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(want) if size == want else b""
    except OSError as e:
        raise CheckpointError(f"{where}: chunk {list(index)} of {name} is unreadable ({e.strerror or e})") from None
    if size != want or len(data) != want:
        raise CheckpointError(f"{where}: chunk {list(index)} of {name} has {size} bytes, expected {want}")
    if checksummed:
        stored = int.from_bytes(data[nbytes:], "little")
        actual = crc32c(memoryview(data)[:nbytes])
        if stored != actual:
            raise CheckpointError(
                f"{where}: chunk {list(index)} of {name} is corrupt (crc32c {actual:08x}, stored {stored:08x})"
            )
        return memoryview(data)[:nbytes]
    return data


def verify(path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> tuple[Config, dict]:
    """Checks the whole checkpoint at `path`: `check`, then every chunk of every array read and its crc32c
    compared, one chunk at a time (memory stays at one chunk). `progress(nbytes)` after each chunk. Returns
    (config, manifest); raises CheckpointError naming the parameter and the chunk at fault."""
    path = pathlib.Path(path)
    cfg, manifest = check(path)
    if version_of(manifest) < 2:
        raise CheckpointError(
            f"{path}: format version {version_of(manifest)} stores no checksums; convert it again to verify it"
        )
    for array_dir, name, index, nbytes in _stored_chunks(path, cfg, manifest):
        _chunk_bytes(array_dir, name, index, nbytes, True)
        if progress is not None:
            progress(nbytes)
    return cfg, manifest


def _stored_chunks(path: pathlib.Path, cfg: Config, manifest: dict) -> Iterator[tuple[pathlib.Path, str, list, int]]:
    """(array directory, parameter name, chunk index, data bytes of a chunk) for every chunk of a checksummed
    checkpoint, each array's metadata checked first."""
    for name, spec in flatten(expected_params(cfg)):
        meta = array_metadata(path, name, tuple(spec.shape), np.dtype(spec.dtype).name, manifest["conversion_id"])
        chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        nbytes = math.prod(chunk) * np.dtype(spec.dtype).itemsize
        array_dir = path / PARAMS_DIR / name.replace("/", ".")
        for region in chunk_regions(tuple(spec.shape), chunk):
            yield array_dir, name, [r.start // c for r, c in zip(region, chunk, strict=True)], nbytes


def _check_chunk_files(path: pathlib.Path, cfg: Config, manifest: dict) -> None:
    """Every chunk a regular file of exactly its size (one stat each, no read). TensorStore reads the bytes it needs
    and checks their crc32c, so bytes appended to a chunk would otherwise go unnoticed."""
    for array_dir, name, index, nbytes in _stored_chunks(path, cfg, manifest):
        where = array_dir.joinpath("c", *map(str, index))
        try:
            info = os.stat(where)
        except OSError as e:
            raise CheckpointError(f"{where}: chunk {index} of {name} is unreadable ({e.strerror or e})") from None
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{where}: chunk {index} of {name} is unreadable (not a regular file)")
        if info.st_size != nbytes + CRC_BYTES:
            raise CheckpointError(
                f"{where}: chunk {index} of {name} has {info.st_size} bytes, expected {nbytes + CRC_BYTES}"
            )


def _restore(
    path: pathlib.Path, cfg: Config, shardings: dict, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[str, object]]:
    """(name, array) of the parameters of `cfg` read from `path` into their shardings (a flat dict, in its order),
    one array at a time, so that the host holds at most about one array beyond what is already on the devices.
    `progress(nbytes)` after each."""
    import jax
    import orbax.checkpoint as ocp

    abstract = dict(flatten(expected_params(cfg)))
    largest = max(a.size * a.dtype.itemsize for a in abstract.values())
    # Orbax's limit on the bytes read at once: one call restores one array, which must fit under it.
    limit_gb = max(1, math.ceil(largest / 1e9))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True, restore_concurrent_gb=limit_gb)
    with ocp.Checkpointer(handler) as ckptr:
        for name, sharding in shardings.items():
            spec = abstract[name]
            target = unflatten([(name, jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding))])
            args = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
            ((_, array),) = flatten(ckptr.restore(path.absolute() / PARAMS_DIR, args=args))
            yield name, array
            if progress is not None:
                progress(spec.size * spec.dtype.itemsize)


def _fused(arrays: Iterator[tuple[str, object]], cfg: Config, copies: int, shardings: dict) -> dict:
    """The flat parameters of `cfg.model_layout(copies)` from (name, array) of the stored layout: each FUSED array
    made on the devices (one jitted program, out_shardings its own) as soon as its last part arrives, and its parts
    dropped; in the order of `fusing_order` (the fused arrays first), the devices hold at most one fused array's
    parts beyond what is loaded."""
    import jax

    from glm4_jax.model import fuse

    owner = {part: path for path, parts in FUSED.items() for part in parts}
    out, pending = {}, {}
    for name, array in arrays:
        if name not in owner:
            out[name] = array
            continue
        fused = owner[name]
        pending[name] = array
        parts = FUSED[fused]
        if all(p in pending for p in parts):
            make = jax.jit(lambda *xs, fused=fused: fuse(fused, xs, copies), out_shardings=shardings[fused])
            out[fused] = jax.block_until_ready(make(*(pending.pop(p) for p in parts)))
    return {name: out[name] for name in cfg.model_layout(copies)}


def fused_first(names: Sequence[str], nbytes: Callable[[str], int]) -> list[str]:
    """`names` with the parts of each FUSED array next to each other and first, the largest fused array first,
    then the other names in their order. Loading in this order fuses the big arrays while little else is on the
    devices: the parts and the fused array of `gate_up` (the largest) are held at once before the rest arrives,
    so the peak while loading is about the larger of the model's bytes and twice the largest fused array
    (GLM-4-9B in bfloat16: 18.0 GB for gate_up against 18.8 GB for the model), not the model plus its parts."""
    groups = [[p for p in parts if p in names] for parts in FUSED.values()]
    groups = sorted((g for g in groups if g), key=lambda g: -sum(nbytes(p) for p in g))
    first = [p for g in groups for p in g]
    return first + [n for n in names if n not in first]


def fusing_order(cfg: Config) -> list[str]:
    """The stored arrays of `cfg` in the order `load` reads them (`fused_first`)."""
    stored = cfg.stored_layout()

    def nbytes(name: str) -> int:
        shape, _, dtype = stored[name]
        return math.prod(shape) * np.dtype(np_dtype(dtype)).itemsize

    return fused_first(list(stored), nbytes)


def data_error(path: pathlib.Path, error: BaseException) -> CheckpointError:
    """A CheckpointError naming the parameter and chunk that a TensorStore read error (wrapped by Orbax) is
    about: "Digest mismatch" is a chunk whose crc32c does not match its bytes."""
    import re

    texts, seen = [], error
    while seen is not None and len(texts) < 8:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    pattern = re.compile(r'"([^"]*/' + PARAMS_DIR + r'/([^/"]+)/c/([0-9/]+))"')
    found = next(((m, t) for t in texts for m in [pattern.search(t)] if m), None)
    if found is None:
        first = next((t.strip().splitlines()[0] for t in texts if t.strip()), type(error).__name__)
        return CheckpointError(f"{path / PARAMS_DIR}: reading the arrays failed ({first[:300]})")
    (file, array, index), text = found[0].groups(), found[1]
    name = array.replace(".", "/")
    if "Digest mismatch" in text:
        what = "is corrupt (crc32c mismatch)"
    elif "is missing" in text:
        what = "is unreadable (the file is missing)"
    else:
        what = f"is unreadable ({text.strip().splitlines()[0][:200]})"
    chunk = [int(i) for i in index.split("/")]
    return CheckpointError(f"{file}: chunk {chunk} of {name} {what}; run python -m glm4_jax.check {path}")


def read_region(array_dir: pathlib.Path, region: tuple[slice, ...]) -> np.ndarray:
    """The block `region` (slices with start and stop) of one stored array, read from its chunk files (the zarr v3
    arrays that `write_params` writes: raw little-endian chunks, edge chunks padded), as a numpy array."""
    meta = json.loads((array_dir / "zarr.json").read_text(encoding="utf-8"))
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    dtype = np_dtype(meta["data_type"])
    if meta.get("codecs") not in (CODECS, CODECS[:1]):  # format 2, or format 1 (no checksum)
        raise CheckpointError(f"{array_dir / 'zarr.json'}: codecs {meta.get('codecs')!r} are not ours")
    checksummed = meta["codecs"] == CODECS
    out = np.empty(tuple(r.stop - r.start for r in region), dtype)
    ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, chunk, strict=True)]
    nbytes = math.prod(chunk) * dtype.itemsize
    for index in itertools.product(*ranges):
        raw = _chunk_bytes(array_dir, array_dir.name.replace(".", "/"), index, nbytes, checksummed)
        data = np.frombuffer(raw, dtype).reshape(chunk)
        src, dst = [], []
        for i, r, c in zip(index, region, chunk, strict=True):
            lo, hi = max(r.start, i * c), min(r.stop, (i + 1) * c)
            src.append(slice(lo - i * c, hi - i * c))
            dst.append(slice(lo - r.start, hi - r.start))
        out[tuple(dst)] = data[tuple(src)]
    return out


def _quantized_arrays(path: pathlib.Path, cfg: Config, target: Config) -> Iterator[tuple[str, np.ndarray]]:
    """(stored path, host array) of every array of `target` (a quantized config) from the dense checkpoint of
    `cfg` at `path`: each matrix quantized one layer at a time (glm4_jax.quant), the rest cast to target.dtype."""
    from glm4_jax import quant

    stored = target.stored_layout()
    layout = cfg.param_layout()
    for name in fused_first(list(layout), lambda n: math.prod(layout[n][0])):
        shape = layout[name][0]
        array_dir = path / PARAMS_DIR / name.replace("/", ".")
        full = tuple(slice(0, n) for n in shape)
        contracted = QUANTIZED.get(name)
        if contracted is None:
            yield name, read_region(array_dir, full).astype(np_dtype(target.dtype))
            continue
        values = np.empty(stored[name][0], np_dtype(stored[name][2]))
        scales = np.empty(stored[name + "_scale"][0], np_dtype(target.dtype))
        stacked = name.startswith("layers/")
        for layer in range(shape[0]) if stacked else (None,):
            region = (slice(layer, layer + 1), *full[1:]) if stacked else full
            dense = read_region(array_dir, region)
            v, sc = quant.quantize(
                dense, contracted, target.quant, target.group_size, scale_dtype=np_dtype(target.dtype)
            )
            if stacked:
                values[layer], scales[layer] = v[0], sc[0]
            else:
                values[...], scales[...] = v, sc
        yield name, values
        yield name + "_scale", scales


@contextlib.contextmanager
def _progress(progress: bool | Callable[[int, int], None] | None, total: int) -> Iterator[Callable[[int], None]]:
    """`step(nbytes)` for `load`: updates a tqdm bar on stderr (progress True), calls `progress(done, total)` (a
    callable), or does nothing."""
    if not progress:
        yield lambda nbytes: None
        return
    if callable(progress):
        done = 0

        def step(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            progress(done, total)

        yield step
        return
    from tqdm import tqdm

    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", file=sys.stderr, dynamic_ncols=True
    ) as bar:
        yield bar.update


def load(
    path: str | os.PathLike,
    *,
    mesh=None,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool | Callable[[int, int], None] | None = None,
):
    """Loads a converted checkpoint as a `GLM4` model.

    Args:
      path: a directory written by `python -m glm4_jax.convert` or by `save`.
      mesh: a `jax.sharding.Mesh` to shard the parameters over (with `glm4_jax.param_shardings`);
        None puts everything on the default device.
      dtype: "bfloat16", "float32" or "float16" to cast the parameters to (and run the model in); None: as stored.
        Quantized values stay as they are; their scales take this dtype.
      quantize: "int8" or "int4" to quantize the matrices of an unquantized checkpoint while loading (one layer at a
        time on the host, so the full-precision model is never on a device); a checkpoint converted with
        `--quantize` is quantized already and needs nothing here.
      group_size: the int4 group size along the input dimension.
      progress: True for a progress bar on stderr (tqdm, in bytes of the loaded parameters); a callable
        `progress(done_bytes, total_bytes)` called after each array; None or False: nothing.
    Returns:
      the model, its parameters restored straight onto their devices one array at a time, so that the host holds
      little more than one array beyond what the devices hold (each process reads only its slices; with
      `quantize`, each process reads the arrays whole and places its shards).
    Raises:
      CheckpointError: `path` is not a complete glm4-jax checkpoint, it does not match its config.json, or
        `quantize` is given for a checkpoint that is quantized already.
      ConfigError: a bad dtype, scheme or group size.
    """
    import jax
    from flax import nnx

    from glm4_jax.model import abstract_model

    path = pathlib.Path(path)
    cfg, manifest = check(path)
    if version_of(manifest) >= 2:
        _check_chunk_files(path, cfg, manifest)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = cfg.replace(dtype=dtype or cfg.dtype)
    if quantize is not None:
        if cfg.quant is not None:
            raise CheckpointError(
                f"{path}: the checkpoint is quantized already ({cfg.quant}); load it without quantize"
            )
        target = target.replace(quant=quantize, group_size=group_size)  # ConfigError for a bad scheme or group
    if mesh is None:
        copies = 1
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        layout = target.model_layout() | target.stored_layout()
        shardings = {name: device for name in layout}
    else:
        from glm4_jax.placement import mesh_kv_copies
        from glm4_jax.sharding.rules import named_sharding

        copies = mesh_kv_copies(target, mesh)
        layout = target.model_layout(copies) | target.stored_layout()
        shardings = {name: named_sharding(mesh, axes, shape, None, name) for name, (shape, axes, _) in layout.items()}
    abstract = abstract_model(target, copies)
    order = fusing_order(target)
    stored_shardings = {name: shardings[name] for name in order}
    with _progress(progress, sum(a.size * a.dtype.itemsize for _, a in flatten(expected_params(target)))) as step:
        if quantize is None:
            try:
                params = _fused(_restore(path, target, stored_shardings, step), target, copies, shardings)
            except Exception as e:  # TensorStore's errors (a crc32c mismatch, a missing chunk) come wrapped by Orbax
                raise data_error(path, e) from None
        else:

            def placed():
                for name, host in _quantized_arrays(path, cfg, target):
                    sharding = shardings[name]
                    yield name, jax.make_array_from_callback(host.shape, sharding, lambda i, h=host: h[i])
                    step(host.nbytes)
                    del host

            params = _fused(placed(), target, copies, shardings)
        params = unflatten(params.items())
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
