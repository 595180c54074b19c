"""The conversion itself: check everything, then write DST atomically, streaming one chunk at a time."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import sys
import threading

from glm4_jax.config import DEFAULT_GROUP_SIZE, Config, np_dtype
from glm4_jax.fileio import remove_tree, staging_dir, stale_temporaries
from glm4_jax.paths import flatten
from glm4_jax.quant import quantized_sources

from .readers import ConvertError, TensorInfo, bin_to_safetensors, find_files, read_header, readahead, sha256
from .table import LAYOUTS, map_tensors

# tiktoken (GLM-4-9B) or tokenizers (GLM-4-0414) files, and the chat template when shipped apart.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DISK_SLACK = 16 << 20  # config, manifest, Orbax metadata


def resolve_source(src: str, revision: str | None = None) -> pathlib.Path:
    """A local directory, or a Hugging Face hub repo id (`org/name`) downloaded when huggingface_hub is present."""
    path = pathlib.Path(src).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise ConvertError(f"{src}: not a directory (SRC is a checkpoint directory)")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", src):
        try:
            import huggingface_hub
        except ImportError:
            raise ConvertError(
                f"{src}: no such directory (to download a hub repo id, install huggingface_hub)"
            ) from None
        try:
            files = huggingface_hub.list_repo_files(src, revision=revision)
            weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
            return pathlib.Path(
                huggingface_hub.snapshot_download(
                    src, revision=revision, allow_patterns=["*.json", "*.jinja", "tokenizer.model", *weights]
                )
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConvertError(f"{src}: no such directory, and downloading it from the hub failed ({msg})") from None
    raise ConvertError(f"{src}: no such directory")


def check_destination(src: pathlib.Path, dst: pathlib.Path, force: bool) -> None:
    """Refuses a DST that overlaps SRC, whose parent is missing, or that exists without being replaceable (see
    `check_replaceable`); an existing DST needs --force, which is suggested only when it would work."""
    s, t = src.resolve(), dst.resolve()
    if s == t or s.is_relative_to(t) or t.is_relative_to(s):
        raise ConvertError(f"{dst}: DST must lie outside SRC ({src}) and not contain it")
    if dst.exists() or dst.is_symlink():
        try:
            check_replaceable(dst)
        except ConvertError as e:
            raise ConvertError(f"{e}{'' if force else '; choose another DST'}") from None
        if not force:
            raise ConvertError(f"{dst}: already exists (use --force to replace it)")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst.parent}: no such directory (the parent of DST must exist)")


def check_replaceable(dst: pathlib.Path) -> None:
    """What --force may replace: an empty directory, or a glm4-jax checkpoint (it has our manifest.json), and never
    the current directory, the home directory, / or a directory that holds one of them."""
    from glm4_jax import checkpoint

    if dst.is_symlink() or not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory; not replacing it, even with --force")
    t = dst.resolve()
    for what, path in (("the current directory", pathlib.Path.cwd()), ("your home directory", pathlib.Path.home())):
        if path.resolve().is_relative_to(t):
            here = "is" if path.resolve() == t else "holds"
            raise ConvertError(f"{dst}: {here} {what}; not replacing it, even with --force")
    if not any(dst.iterdir()):
        return
    try:
        checkpoint.read_manifest(dst)
    except checkpoint.CheckpointError:
        raise ConvertError(
            f"{dst}: exists and is not a glm4-jax checkpoint (no {checkpoint.MANIFEST} of ours); not replacing it, "
            "even with --force"
        ) from None


def report_stale_temporaries(dst: pathlib.Path) -> None:
    """Names (on stderr) the temporaries an earlier, killed conversion into `dst` left, and removes those that are
    safe to remove: a `.NAME.tmp-*` never became DST; a `.NAME.old-*` (an old DST moved aside) is removed when DST
    exists, and is all that is left of the old checkpoint when DST does not."""
    for path in stale_temporaries(dst):
        if path.name.startswith(f".{dst.name}.old-") and not dst.exists():
            print(
                f"note: {path} holds the checkpoint an earlier conversion moved aside before it was stopped, and "
                f"{dst} is missing: rename it back with `mv {path} {dst}`",
                file=sys.stderr,
            )
            continue
        remove_tree(path)
        state = "removed" if not os.path.lexists(path) else "could not remove"
        print(f"note: {state} {path}, left by an earlier conversion that was stopped", file=sys.stderr)


def inventory(files, tmp: pathlib.Path | None) -> dict[str, TensorInfo]:
    """Every tensor of the source, by name; .bin shards are first rewritten as safetensors under `tmp`."""
    tensors: dict[str, TensorInfo] = {}
    for path in files.files:
        if files.kind == "bin":
            out = tmp / (path.name + ".safetensors")
            bin_to_safetensors(path, out)
            found = read_header(out, origin=str(path))
        else:
            found = read_header(path)
        for name, info in found.items():
            if name in tensors:
                raise ConvertError(f"{path}: tensor {name} is also in {tensors[name].origin}")
            tensors[name] = info
    if files.index_map is not None:
        for name, fname in files.index_map.items():
            if name not in tensors or pathlib.Path(tensors[name].origin).name != fname:
                where = f"it is in {tensors[name].origin}" if name in tensors else "no file has it"
                raise ConvertError(f"{files.index}: lists tensor {name} in {fname}, but {where}")
    return tensors


class Progress:
    """tqdm on stderr: bytes written, throughput, and how many source tensors are done."""

    def __init__(self, total_bytes: int, tensors: list[TensorInfo], enabled: bool | None):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="converting",
            file=sys.stderr,
            disable=None if enabled is None else not enabled,  # None: only on a terminal
            dynamic_ncols=True,
        )
        self.left = {t.name: t.nbytes // t.dtype.itemsize for t in tensors}
        self.total = len(tensors)
        self.done = 0
        self.lock = threading.Lock()
        self.bar.set_postfix_str(f"tensors 0/{self.total}", refresh=False)

    def read(self, info: TensorInfo, elements: int) -> None:
        with self.lock:
            self.left[info.name] -= elements
            if self.left[info.name] == 0:
                self.done += 1
                self.bar.set_postfix_str(f"tensors {self.done}/{self.total}", refresh=False)

    def wrote(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


class Hasher:
    """sha256 of the source files alongside the conversion, several files at once on machines with the cores for
    it (a quarter of them; the conversion has the rest), stopped at once on failure."""

    def __init__(self, paths: list[pathlib.Path]):
        self.digests: dict[pathlib.Path, str] = {}
        self.stop = threading.Event()
        threads = max(1, min(len(paths), (os.cpu_count() or 2) // 4))
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sha256")
        # in file order, the order in which the conversion reads them too
        self.futures = {p: self.pool.submit(sha256, p, stop=self.stop) for p in paths}
        self.pool.shutdown(wait=False)

    def result(self) -> dict[pathlib.Path, str]:
        try:
            return {p: f.result() for p, f in self.futures.items()}
        except Exception as e:
            raise ConvertError(f"hashing the source files failed: {e}") from None


def tokenizer_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The tokenizer files of SRC to copy into DST. Each must be a regular file inside SRC: a symlink that leads
    out of it is refused (it would copy a file from elsewhere into DST), except into the `blobs/` folder of a Hugging
    Face cache when SRC is one of its snapshots (where every file is such a link)."""
    inside = [root.resolve()]
    if root.parent.name == "snapshots":
        inside.append((root.parent.parent / "blobs").resolve())
    found = []
    for name in TOKENIZER_FILES:
        path = root / name
        if not os.path.lexists(path):
            continue
        target = path.resolve()
        if not any(target.is_relative_to(d) for d in inside):
            raise ConvertError(f"{path}: a link to {target}, outside SRC; copy the file itself into SRC")
        if not target.is_file():
            raise ConvertError(f"{path}: not a regular file")
        found.append(path)
    return found


def copy_at_most_as_open(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies a file; the copy is no more readable (or writable) than the source."""
    shutil.copyfile(src, dst)
    os.chmod(dst, os.stat(dst).st_mode & os.stat(src).st_mode & 0o777)


def _replaceable(dst: pathlib.Path) -> None:
    try:
        check_replaceable(dst)
    except ConvertError as e:
        raise ConvertError(f"{e} (it changed during the conversion)") from None


def _layout(config_path: pathlib.Path) -> str:
    kind = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if kind == "glm4_jax":
        raise ConvertError(f"{config_path}: already a converted glm4-jax checkpoint; load it directly")
    if kind not in LAYOUTS:
        raise ConvertError(f"{config_path}: model_type {kind!r} has no name table")
    return kind


def convert(
    src: str,
    dst: str,
    *,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    force: bool = False,
    hash_files: bool = True,
    progress: bool | None = None,
    revision: str | None = None,
    allow_nonfinite: bool = False,
) -> pathlib.Path:
    """Converts the GLM-4 checkpoint `src` into a glm4-jax checkpoint at `dst` (see `python -m glm4_jax.convert
    --help`) and returns the path of `dst`.

    Raises ConvertError or ConfigError for bad input; everything that can be checked is checked before anything
    is written, except the values: NaN or Inf in a weight (unless `allow_nonfinite`), or a value that overflows
    float16, stops the conversion with a ConvertError naming the tensor and index. On any error or
    KeyboardInterrupt, `dst` is left as it was and no temporary remains.
    """
    from glm4_jax import checkpoint

    root = resolve_source(src, revision)
    dst_path = pathlib.Path(dst).expanduser().absolute()
    check_destination(root, dst_path, force)
    report_stale_temporaries(dst_path)
    np_dtype(dtype)
    config_path = root / "config.json"
    cfg = Config.from_file(config_path).replace(dtype=dtype)
    if quantize is not None:
        cfg = cfg.replace(quant=quantize, group_size=group_size)  # ConfigError naming a tensor the group misfits
    layout = _layout(config_path)
    files = find_files(root)
    tensors = None
    if files.kind == "safetensors":
        tensors = inventory(files, None)
        map_tensors(cfg, layout, tensors)  # every name and shape checked before anything is written

    out_bytes = sum(a.size * a.dtype.itemsize for _, a in flatten(checkpoint.expected_params(cfg)))
    extra = tokenizer_files(root)
    need = out_bytes + sum(p.stat().st_size for p in extra) + DISK_SLACK
    if files.kind == "bin":
        need += files.total_bytes  # the shards rewritten as safetensors, until the end
    free = shutil.disk_usage(dst_path.parent).free
    if need > free:
        raise ConvertError(
            f"{dst_path.parent}: not enough disk space for DST: {need / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free"
        )

    sources = [config_path, *([files.index] if files.index else []), *files.files]
    hasher = None
    with staging_dir(dst_path, overwrite=force, replaceable=_replaceable) as tmp:
        try:
            if tensors is None:
                work = tmp / ".bin-as-safetensors"
                work.mkdir()
                tensors = inventory(files, work)
            dests, used = map_tensors(cfg, layout, tensors)
            readahead(sorted({t.path for t in used}))
            hasher = Hasher(sources) if hash_files else None
            bar = Progress(out_bytes, used, progress)
            for _, dest in flatten(dests):
                dest.on_read = bar.read
                dest.allow_nonfinite = allow_nonfinite
            if cfg.quant is not None:
                dests = quantized_sources(dests, cfg)
            try:
                conversion_id = checkpoint.write_params(tmp / checkpoint.PARAMS_DIR, dests, cfg, progress=bar.wrote)
            finally:
                bar.close()
            cfg.save(tmp / checkpoint.CONFIG)
            for p in extra:
                copy_at_most_as_open(p, tmp / p.name)
            if files.kind == "bin":
                shutil.rmtree(work)
            digests = hasher.result() if hasher else {}
            record = [{"name": p.name, "bytes": p.stat().st_size, "sha256": digests.get(p)} for p in sources]
            source = {
                "path": str(src),
                "layout": "thudm" if layout == "chatglm" else "transformers",
                "format": files.kind,
                "dtypes": sorted({t.dtype.name for t in used}),
                "files": record,
            }
            writer = f"glm4_jax.convert {checkpoint.package_version()}"
            checkpoint.write_manifest(tmp, cfg, dests, source=source, writer=writer, conversion_id=conversion_id)
        except BaseException:
            if hasher is not None:
                hasher.stop.set()
            raise
    return dst_path
