"""File I/O the converter and the checkpoint writer share: array sources, per-thread buffers, in-kernel copies,
and publishing a directory atomically.

Nothing here knows the checkpoint format (glm4_jax/checkpoint.py) or the source formats (glm4_jax/convert/).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import pathlib
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np


class ArraySource:
    """An array that is produced one region at a time. Subclasses set `shape` and `dtype` and implement
    `read_into`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read_into(self, region: tuple[slice, ...], out: np.ndarray) -> None:
        """Writes the block `array[region]` (one slice with step 1 per axis) into `out`, a C-contiguous array of
        that block's shape and of dtype `self.dtype`."""
        raise NotImplementedError

    def position(self, region: tuple[slice, ...]) -> tuple:
        """Where the data of `array[region]` comes from, as a sortable key: the writer makes the chunks in this
        order, so that sources on disk are read front to back. () (the default) keeps the order of the tree."""
        return ()

    def copy_into(self, region: tuple[slice, ...], fd: int) -> bool:
        """Writes `array[region]` to the file `fd` inside the kernel (`copy_range`) when the source holds it exactly
        as it must be written, as one byte range of a file, and returns True; otherwise (the default) writes
        nothing and returns False, and the writer uses `read_into`."""
        return False


class NumpySource(ArraySource):
    """An array already in memory (numpy, or anything `np.asarray` accepts, such as a jax.Array)."""

    def __init__(self, value, dtype=None):
        self.value = np.asarray(value)
        self.dtype = np.dtype(dtype or self.value.dtype)
        self.shape = tuple(self.value.shape)

    def read_into(self, region, out):
        out[...] = self.value[region]


class ScratchBuffer:
    """A byte buffer for each thread, kept between calls (so its pages are faulted in once) and grown as needed.
    `get` returns a view that the thread's next `get` overwrites."""

    def __init__(self, min_bytes: int = 0):
        self.min_bytes = min_bytes
        self._local = threading.local()

    def get(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            self._local.buf = buf = np.empty(max(nbytes, self.min_bytes), np.uint8)
        return buf[:nbytes]


def _crc32c_tensorstore(data) -> int:
    """CRC-32C through TensorStore's zarr v3 `crc32c` codec (a chunk written to an in-memory store carries it in
    its last 4 bytes): the fallback where the `crc32c` package is not installed."""
    import tensorstore as ts

    buf = np.frombuffer(data, np.uint8)
    if not buf.size:
        return 0
    n = buf.size
    meta = {
        "shape": [buf.size],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [n]}},
        "data_type": "uint8",
        "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        "fill_value": 0,
    }
    spec = {"driver": "zarr3", "kvstore": {"driver": "memory"}, "metadata": meta, "create": True}
    store = ts.open({**spec, "store_data_equal_to_fill_value": True}).result()
    store[...] = buf
    stored = store.kvstore.read("c/0").result().value
    return int.from_bytes(stored[-4:], "little")


def crc32c(data) -> int:
    """The CRC-32C (Castagnoli) of a buffer, the checksum of zarr v3's `crc32c` codec: with the `crc32c` package
    (hardware, about 10 GB/s) when installed, else through TensorStore (about 0.2 GB/s)."""
    try:
        import crc32c as fast
    except ImportError:
        return _crc32c_tensorstore(data)
    return fast.crc32c(data)


def write_all(fd: int, data: memoryview, path: str) -> None:
    while len(data):
        n = os.write(fd, data)
        if n <= 0:
            raise OSError(f"{path}: short write")
        data = data[n:]


def copy_range(path: str | os.PathLike, offset: int, nbytes: int, fd: int) -> bool:
    """Appends `nbytes` bytes of the file `path`, from `offset`, to the file `fd` with copy_file_range: no copy
    through user space, as `cp` does. Returns False, with nothing written, where the kernel cannot (an older
    kernel across filesystems, say); raises OSError if `path` is shorter."""
    if not hasattr(os, "copy_file_range"):
        return False
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < nbytes:
            try:
                n = os.copy_file_range(src, fd, nbytes - done, offset + done)
            except OSError as e:
                if done == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    return False
                raise
            if n <= 0:
                raise OSError(errno.EIO, f"{path}: ends before byte {offset + nbytes}")
            done += n
    finally:
        os.close(src)
    return True


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


class PublishedInterrupt(KeyboardInterrupt):
    """Ctrl-C after the new directory was published, while the old one (moved aside) was being removed: `dst` holds
    the new directory, and what is left of the old one is at `leftover`."""

    def __init__(self, dst: pathlib.Path, leftover: pathlib.Path):
        self.dst, self.leftover = dst, leftover
        super().__init__(f"{dst} was written; the old copy is left at {leftover}")


def temporary_names(dst: pathlib.Path) -> tuple[str, str]:
    """The glob patterns of the hidden siblings `staging_dir` makes for `dst`: (being written, moved aside)."""
    return f".{dst.name}.tmp-*", f".{dst.name}.old-*"


@contextlib.contextmanager
def staging_dir(
    dst: str | os.PathLike, *, overwrite: bool = False, replaceable: Callable[[pathlib.Path], None] | None = None
) -> Iterator[pathlib.Path]:
    """Yields a fresh temporary sibling of `dst` to write into; puts it at `dst` when the block succeeds.

    `dst` is claimed at the start: when it does not exist it is created at once as an empty directory (an exclusive
    `mkdir`), so a second writer of the same `dst` fails from the start instead of replacing the first one's work.
    At the end the temporary is renamed onto that empty directory, which the kernel refuses when anything was put
    into it in the meantime: then FileExistsError, and `dst` keeps what was put there.
    An existing `dst` is refused unless `overwrite`; then `replaceable(dst)` (when given) is called at the start
    and again right before the swap, and raises to refuse. The swap is atomic where the kernel has
    renameat2(RENAME_EXCHANGE) (Linux): at any moment, a kill included, `dst` is the old directory or the new one.
    On any exception (KeyboardInterrupt included) before the swap, the temporary is removed and `dst` is left as
    it was (and an empty `dst` this call created is removed). While the block runs the temporary is locked
    (flock), so `stale_temporaries` can tell a live writer's temporaries from those of a killed one.
    """
    dst = pathlib.Path(dst).absolute()
    claimed = False
    try:
        os.mkdir(dst)
        claimed = True
    except FileExistsError:
        if not overwrite:
            raise FileExistsError(f"{dst} already exists") from None
        if replaceable is not None:
            replaceable(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        lock = _lock(tmp)
    except BaseException:
        if claimed:
            _rmdir_if_empty(dst)
        raise
    published = False
    try:
        yield tmp
        fsync_tree(tmp)
        if claimed:
            try:
                os.rename(tmp, dst)  # onto our empty directory; refused if it is no longer empty
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise FileExistsError(
                        f"{dst}: something was put there while it was being written; not replacing it"
                    ) from None
                raise
            published = True
            return
        if replaceable is not None:
            replaceable(dst)
        if _exchange(tmp, dst):  # tmp now holds the old directory
            published = True
            old = tmp
        else:
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            published = True
        try:
            remove_tree(old)
        except KeyboardInterrupt:
            raise PublishedInterrupt(dst, old) from None
    except BaseException:
        if not published:
            remove_tree(tmp)
            if claimed:
                _rmdir_if_empty(dst)
        raise
    finally:
        os.close(lock)


def stale_temporaries(dst: str | os.PathLike) -> list[pathlib.Path]:
    """The temporaries of `staging_dir` for `dst` that no running writer holds (left by a killed one), oldest
    first. Those named `.NAME.tmp-*` never became `dst` (or hold an old copy being removed) and are safe to
    remove; a `.NAME.old-*` is an old `dst` moved aside, which is all there is when `dst` is missing."""
    dst = pathlib.Path(dst).absolute()
    found = []
    for pattern in temporary_names(dst):
        for path in dst.parent.glob(pattern):
            if path.is_symlink() or not path.is_dir():
                continue
            try:
                fd = _lock(path, wait=False)
            except (BlockingIOError, OSError):
                continue  # held by a writer that is still running (or unreadable: not ours to judge)
            os.close(fd)
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _lock(path: pathlib.Path, wait: bool = True) -> int:
    """An fd of the directory `path`, holding an exclusive flock on it (released when the fd is closed, or the
    process dies). Raises BlockingIOError when `wait` is False and another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except ImportError:  # no flock (Windows): no lock
        pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def _rmdir_if_empty(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swaps the directories `a` and `b` in one step (Linux renameat2 with RENAME_EXCHANGE); False, with nothing
    done, where the C library or the filesystem cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_tree(path: pathlib.Path) -> None:
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
