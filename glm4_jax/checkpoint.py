"""Converted checkpoints: write them chunk by chunk, check them, restore them straight into shardings.

A converted checkpoint is a directory (docs/DESIGN.md):

    config.json          normalized Config (model_type "glm4_jax")
    manifest.json        format, versions, parameter list, source files; written last, so it marks completion
    params/              Orbax checkpoint (OCDBT, zarr3) of the parameter tree of `glm4_jax.model.GLM4`
    tokenizer.model ...  copied by the converter when the source has them

This is the only module that calls Orbax. Writing goes through `write_params`, which takes a tree of
`ArraySource`s (a `shape`, a `dtype` and `read_into(region, out)`) and writes each array one storage chunk
(at most 30 MiB) at a time through a custom Orbax TypeHandler: a converter produces the chunks on demand from
the source files, a few at once, and its memory does not grow with the model. The arrays are recorded as plain
numpy arrays, so restoring uses Orbax's own handlers. Everything is written into a temporary sibling that is
fsync'ed and renamed at the end (`staging_dir`). `save` writes an in-memory model the same way; `load` restores
one straight into its target shardings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import itertools
import json
import os
import pathlib
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from glm4_jax.config import DTYPES, Config, ConfigError

FORMAT = "glm4-jax-checkpoint"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
MANIFEST = "manifest.json"
CONFIG = "config.json"

# The most bytes in one storage chunk (the unit of writing, and of reading back). Under glibc's 32 MiB mmap
# threshold, so the chunk buffers freed after each write are reused instead of mapped and zeroed afresh.
CHUNK_BYTES = 30 << 20
MAX_IN_FLIGHT = 4  # chunks in memory at once while saving (being produced or written)
PRODUCERS = 2  # threads producing chunks (reading and transposing) while TensorStore writes others


class CheckpointError(ValueError):
    """A directory that is not a complete glm4-jax checkpoint, or one that does not match its config."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("glm4-jax")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


# ---- sources of array data --------------------------------------------------------------------------------------


class ArraySource:
    """An array that is produced one region at a time. Subclasses set `shape` and `dtype` and implement
    `read_into`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read_into(self, region: tuple[slice, ...], out: np.ndarray) -> None:
        """Writes the block `array[region]` (one slice with step 1 per axis) into `out`, a C-contiguous array of
        that block's shape and of dtype `self.dtype`."""
        raise NotImplementedError

    # Orbax looks at these.
    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


class NumpySource(ArraySource):
    """An array already in memory (numpy, or anything `np.asarray` accepts, such as a jax.Array)."""

    def __init__(self, value, dtype=None):
        self.value = np.asarray(value)
        self.dtype = np.dtype(dtype or self.value.dtype)
        self.shape = tuple(self.value.shape)

    def read_into(self, region, out):
        out[...] = self.value[region]


def chunk_regions(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The regions of a regular chunk grid, in C order."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(corner, chunk, shape, strict=True))


# ---- writing ----------------------------------------------------------------------------------------------------


class _Writing:
    """State shared by a save call and Orbax's writers: the threads producing chunks, a bound on the chunks in
    memory, and cooperative cancellation.

    A cancelled (or failed) save does not raise inside Orbax: each writer returns quietly after the chunk it has
    under way, so that every TensorStore write is awaited before Orbax closes its event loop. The caller then
    raises, and deletes what was written.
    """

    def __init__(self, progress: Callable[[int], None] | None, max_in_flight: int, producers: int):
        self.progress = progress
        self.max_in_flight = max_in_flight
        self.producers = concurrent.futures.ThreadPoolExecutor(producers, thread_name_prefix="checkpoint-chunk")
        self.cancelled = threading.Event()
        self.failure: BaseException | None = None  # the first error of a producer
        self._semaphores: dict[int, asyncio.Semaphore] = {}

    def semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        return self._semaphores.setdefault(id(loop), asyncio.Semaphore(self.max_in_flight))

    async def produce(self, value: ArraySource, region: tuple[slice, ...]) -> np.ndarray | None:
        """`value[region]` as a new array made by a producer thread, or None after a failure (recorded, and the
        save cancelled). Polled, so that no thread ever calls back into the event loop."""

        def work():
            block = np.empty(tuple(s.stop - s.start for s in region), value.dtype)
            value.read_into(region, block)
            return block

        future = self.producers.submit(work)
        while not future.done():
            await asyncio.sleep(0.002)
        try:
            return future.result()
        except BaseException as e:
            self.failure = self.failure or e
            self.cancelled.set()
            return None


def _streaming_handler(writing: _Writing):
    """An Orbax TypeHandler that writes `ArraySource`s chunk by chunk. It records them as plain numpy arrays
    ('np.ndarray'), so restoring needs no custom handler."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            # No defensive host copy: the sources are read lazily, chunk by chunk.
            super().__init__(deepcopy_host_arrays=False)

        async def _open_and_write(self, value: ArraySource, tspec: dict[str, Any], ts_context):
            if writing.cancelled.is_set():
                return
            _no_fsync(tspec)  # one fsync of the whole tree at the end instead (staging_dir): much faster
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            chunk = tuple(t.chunk_layout.write_chunk.shape)
            for region in chunk_regions(tuple(value.shape), chunk):
                async with writing.semaphore():  # at most max_in_flight chunks in memory
                    block = None if writing.cancelled.is_set() else await writing.produce(value, region)
                    if block is None:
                        return
                    await t[region].write(block, can_reference_source_data_indefinitely=True)
                if writing.progress is not None:
                    writing.progress(block.nbytes)
                del block

    return StreamingHandler()


def _no_fsync(spec: dict) -> None:
    """Turns off TensorStore's fsync after every write in the file kvstores of a spec (in place)."""
    for value in spec.values():
        if isinstance(value, dict):
            if value.get("driver") == "file":
                value["file_io_sync"] = False
            _no_fsync(value)


def fsync_tree(root: pathlib.Path) -> None:
    """fsync every file and directory under `root` (and `root`), several at a time, so that a rename after it
    publishes data that is on disk."""

    def fsync(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    files, dirs = [], []
    for dirpath, _, filenames in os.walk(root):
        files.extend(os.path.join(dirpath, name) for name in filenames)
        dirs.append(dirpath)
    with concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="fsync") as pool:
        list(pool.map(fsync, files))
        list(pool.map(fsync, dirs))


def write_params(
    directory: str | os.PathLike,
    sources: dict,
    *,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
    max_in_flight: int | None = None,
    compress: bool = False,
) -> None:
    """Writes a nested dict of `ArraySource`s as an Orbax checkpoint at `directory` (which must not exist).

    Arrays are cut into chunks of at most `chunk_bytes`; arrays with a leading layer axis (under "layers") get
    one layer per chunk. At most `max_in_flight` chunks are in memory at once. `progress(nbytes)` is called after
    each chunk is written. The chunks are not fsync'ed one by one: `staging_dir` syncs the whole tree once before
    publishing it. On any error or KeyboardInterrupt the writers are stopped before the exception propagates (an
    error from `read_into` propagates as it is), so the caller may delete the directory at once.
    """
    import jax
    import orbax.checkpoint as ocp

    chunk_bytes, max_in_flight = chunk_bytes or CHUNK_BYTES, max_in_flight or MAX_IN_FLIGHT
    writing = _Writing(progress, max_in_flight, producers=min(PRODUCERS, max_in_flight))
    registry = ocp.type_handlers.create_type_handler_registry(
        (ArraySource, _streaming_handler(writing)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # unused; Orbax warns when it is absent
    )

    def save_args(path, leaf):
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        return ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if stacked else ())

    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=True, use_zarr3=True, use_compression=compress, type_handler_registry=registry
    )
    checkpointer = ocp.Checkpointer(handler)
    args = ocp.args.PyTreeSave(sources, save_args=jax.tree_util.tree_map_with_path(save_args, sources))
    errors: list[BaseException] = []

    def save():
        try:
            checkpointer.save(pathlib.Path(directory).absolute(), args=args)
        except BaseException as e:
            errors.append(e)

    # Orbax runs its event loop in the calling thread; a KeyboardInterrupt there would tear the loop down under
    # TensorStore's writes. So the save runs in a thread of its own, and an interrupt here cancels it cleanly.
    thread = threading.Thread(target=save, name="checkpoint-save", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except BaseException:
        writing.cancelled.set()  # each writer stops after the chunk it has under way
        thread.join()
        raise
    finally:
        writing.producers.shutdown(wait=True)
        checkpointer.close()
    if writing.failure is not None:
        raise writing.failure
    if errors:
        raise errors[0]


@contextlib.contextmanager
def staging_dir(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a fresh temporary sibling of `dst` to write into; renames it to `dst` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary is removed and `dst` is left as it was. An existing
    `dst` is refused unless `overwrite`, and then replaced only once the new one is complete.
    """
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            _remove(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: pathlib.Path) -> None:
    """Removes a file or a tree; looks again briefly in case a writer being stopped had recreated something."""
    for _ in range(20):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        time.sleep(0.05)
        if not os.path.lexists(path):
            return


def write_manifest(
    directory: str | os.PathLike,
    cfg: Config,
    params: dict,
    *,
    source: dict | None = None,
    writer: str = "glm4_jax.checkpoint.save",
) -> None:
    """Writes manifest.json: the format, the versions, every parameter's shape and dtype, and the source files."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "writer": writer,
        "converter_version": package_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": cfg.dtype,
        "params": {
            name: {"shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name} for name, leaf in flatten(params)
        },
        "source": source,
    }
    path = pathlib.Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """[("layers/q", leaf), ...] for a nested dict, keys joined with '/', in sorted order."""
    out = []
    for key in sorted(tree):
        value = tree[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten(value, name + "/"))
        else:
            out.append((name, value))
    return out


def save(path: str | os.PathLike, model_or_params, cfg: Config, *, overwrite: bool = False) -> None:
    """Writes a GLM4 model (or its parameter dict) as a converted checkpoint at `path`, atomically."""
    from flax import nnx

    if isinstance(model_or_params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    else:
        params = model_or_params
    params = _map(lambda x: NumpySource(x, np_dtype(cfg.dtype)), params)
    _check_tree(params, cfg, what="parameters given to save()")
    with staging_dir(path, overwrite=overwrite) as tmp:
        write_params(tmp / PARAMS_DIR, params)
        cfg.save(tmp / CONFIG)
        write_manifest(tmp, cfg, params)


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


# ---- checking and loading -------------------------------------------------------------------------------------


def expected_params(cfg: Config) -> dict:
    """The parameter tree of `GLM4(cfg)` as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    from flax import nnx

    from glm4_jax.model import abstract_model

    return nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))


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
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format version {version!r}; this glm4-jax ({package_version()}) reads up to {FORMAT_VERSION}"
        )
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
    listed = {name: (tuple(v["shape"]), v["dtype"]) for name, v in manifest.get("params", {}).items()}
    if listed != want:
        diff = sorted(k for k in set(want) | set(listed) if want.get(k) != listed.get(k))
        raise CheckpointError(f"{path / MANIFEST}: parameters {diff} do not match {CONFIG}")
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


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype for a Config dtype name ("bfloat16" is ml_dtypes' type)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _restore(path: pathlib.Path, cfg: Config, shardings: dict) -> dict:
    import jax
    import orbax.checkpoint as ocp

    abstract = expected_params(cfg)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(path.absolute() / PARAMS_DIR, args=ocp.args.StandardRestore(target))


def load_params(path: str | os.PathLike, shardings: dict, *, dtype: str | None = None) -> tuple[Config, dict]:
    """Restores the parameter tree straight into `shardings` (a nested dict of `jax.sharding.Sharding`s shaped
    like the parameters), each process reading only its slices, cast to `dtype` (default: the stored one).

    Returns (config, parameters); the config's dtype is the one the parameters now have.
    """
    cfg, _ = check(path)
    if dtype is not None:
        np_dtype(dtype)
        cfg = cfg.replace(dtype=dtype)
    return cfg, _restore(pathlib.Path(path), cfg, shardings)


def load(path: str | os.PathLike, *, mesh=None, dtype: str | None = None):
    """Loads a converted checkpoint as a `GLM4` model.

    Args:
      path: a directory written by `python -m glm4_jax.convert` or by `save`.
      mesh: a `jax.sharding.Mesh` to shard the parameters over (with `glm4_jax.sharding.param_shardings`);
        None puts everything on the default device.
      dtype: "bfloat16", "float32" or "float16" to cast the parameters to (and run the model in); None: as stored.
    Returns:
      the model, its parameters restored straight onto their devices (each process reads only its slices).
    Raises:
      CheckpointError: `path` is not a complete glm4-jax checkpoint, or it does not match its config.json.
    """
    import jax
    from flax import nnx

    from glm4_jax.model import abstract_model

    path = pathlib.Path(path)
    cfg, _ = check(path)
    if dtype is not None:
        np_dtype(dtype)
        cfg = cfg.replace(dtype=dtype)
    abstract = abstract_model(cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, expected_params(cfg))
    else:
        from glm4_jax.sharding import param_shardings

        shardings = param_shardings(abstract, mesh)
    params = _restore(path, cfg, shardings)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
