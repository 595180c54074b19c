"""`python -m glm4_jax.check DST`: verify a converted checkpoint whole, on demand.

Checks the manifest, config.json and every array's metadata (`glm4_jax.checkpoint.check`: shapes, dtypes, codecs,
the conversion id that ties params/ to its manifest), then reads every chunk and compares its crc32c
(`glm4_jax.checkpoint.verify`), one chunk at a time, so memory stays at one chunk (at most 30 MiB). Prints
`ok DST: N parameters, B bytes verified` and exits 0; on the first fault prints one line `error: ...` naming the
file, the parameter and the chunk, and exits 2. `python -m glm4_jax.convert --verify DST` does the same.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage dump
        _fail(f"{message} (see --help)")


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


def run(path: str, progress: bool | None = None) -> int:
    """Verifies the checkpoint at `path`; returns 0, or exits with status 2 and one `error:` line."""
    from tqdm import tqdm

    from glm4_jax import checkpoint
    from glm4_jax.config import ConfigError
    from glm4_jax.paths import flatten

    bar = tqdm(
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="verifying",
        file=sys.stderr,
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
    try:
        cfg, _ = checkpoint.verify(path, progress=bar.update)
    except (checkpoint.CheckpointError, ConfigError) as e:
        bar.close()
        _fail(str(e))
    except KeyboardInterrupt:
        bar.close()
        _fail(f"interrupted; {path} was not fully verified")
    bar.close()
    specs = flatten(checkpoint.expected_params(cfg))
    nbytes = sum(s.size * s.dtype.itemsize for _, s in specs)
    print(f"ok {path}: {len(specs)} parameters, {nbytes} bytes verified", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = _Parser(prog="python -m glm4_jax.check", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("path", metavar="DST", help="a checkpoint written by python -m glm4_jax.convert")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("-q", "--quiet", dest="progress", action="store_false", default=None, help="no progress bar")
    bar.add_argument("--progress", dest="progress", action="store_true", help="a progress bar even off a terminal")
    args = p.parse_args(argv)
    return run(args.path, args.progress)


if __name__ == "__main__":
    sys.exit(main())
