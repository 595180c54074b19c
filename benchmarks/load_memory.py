"""Host memory of `glm4_jax.load`: peak resident memory while loading, above the bytes of the loaded parameters.

    python benchmarks/load_memory.py                    # real GLM-4-9B widths, 2 layers, bf16: 2.6 GB
    python benchmarks/load_memory.py --layers 4 --dtype float32

Writes a converted checkpoint of random values (glm4_jax.checkpoint.write_params, one chunk at a time, so the
writer holds little) in a temporary directory under --workdir, then loads it with `glm4_jax.load` in a fresh
subprocess on the CPU backend, where the "device" arrays live in host memory too. It prints the child's peak
resident memory (`os.wait4` rusage), the bytes of the parameters it ends up holding, the difference (the host
overhead of loading) and the target: overhead <= 1.5 GB + the largest tensor. The checkpoint is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import sys, time
import glm4_jax
from glm4_jax.paths import flatten
from glm4_jax.placement import param_tree
t = time.perf_counter()
model = glm4_jax.load(sys.argv[1], dtype=sys.argv[2] or None)
leaves = [x for _, x in flatten(param_tree(model))]
for x in leaves:
    x.block_until_ready()
print(sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves), time.perf_counter() - t)
"""


class RandomSource:
    """Random values of one stored array, made one region at a time."""

    def __init__(self, shape, dtype, seed):
        self.shape, self.dtype, self.seed = tuple(shape), np.dtype(dtype), seed

    def read_into(self, region, out):
        rng = np.random.default_rng([self.seed, *(r.start for r in region)])
        out[...] = (rng.standard_normal(out.shape, np.float32) * 0.02).astype(self.dtype)

    def position(self, region):
        return ()

    def copy_into(self, region, fd):
        return False


def build(path: str, layers: int, vocab: int, dtype: str) -> None:
    from glm4_jax import checkpoint
    from glm4_jax.config import Config, np_dtype
    from glm4_jax.fileio import staging_dir
    from glm4_jax.paths import unflatten

    cfg = Config.glm_4_9b_chat().replace(num_layers=layers, vocab_size=vocab, dtype=dtype)
    sources = unflatten(
        (name, RandomSource(shape, np_dtype(dt), i))
        for i, (name, (shape, _, dt)) in enumerate(cfg.stored_layout().items())
    )
    with staging_dir(path) as tmp:
        checkpoint.write_params(tmp / checkpoint.PARAMS_DIR, sources, cfg)
        cfg.save(tmp / checkpoint.CONFIG)
        checkpoint.write_manifest(tmp, cfg, sources, writer="benchmarks/load_memory.py")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151552)
    p.add_argument("--dtype", default="bfloat16", help="the stored dtype")
    p.add_argument("--load-dtype", default="", help="the dtype to load as (default: as stored)")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: the system's)")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="load-memory-", dir=args.workdir)
    try:
        ckpt = os.path.join(root, "ckpt")
        build(ckpt, args.layers, args.vocab, args.dtype)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, ckpt, args.load_dtype], stdout=subprocess.PIPE, text=True, env=env
        )
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            print(f"error: the loading subprocess failed (status {status})", file=sys.stderr)
            return 1
        params, largest, seconds = out.split()
        params, largest = int(params), int(largest)
        peak = usage.ru_maxrss * 1024  # kilobytes on Linux
        over = peak - params
        limit = 1.5e9 + largest
        print(f"checkpoint: {args.layers} layers at GLM-4-9B widths, vocab {args.vocab}, {args.dtype}")
        print(
            f"parameters loaded: {params / 1e9:.3f} GB (largest tensor {largest / 1e9:.3f} GB), {float(seconds):.1f} s"
        )
        print(f"peak RSS of the loading process: {peak / 1e9:.3f} GB ({peak / params:.2f}x the parameters)")
        print(f"host overhead (peak RSS - parameters): {over / 1e9:.3f} GB")
        print(f"target: <= 1.5 GB + largest tensor = {limit / 1e9:.3f} GB: {'met' if over <= limit else 'NOT met'}")
        return 0 if over <= limit else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
