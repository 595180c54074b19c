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
from collections.abc import Iterator

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
            remove_tree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        remove_tree(tmp)
        raise


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
