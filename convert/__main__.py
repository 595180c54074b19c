"""Command line: `python -m glm4_jax.convert SRC DST [--dtype ...] [--force]` (also installed as glm4-convert)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

from glm4_jax.config import DEFAULT_GROUP_SIZE, DTYPES, QUANT_SCHEMES

DESCRIPTION = """\
Convert a GLM-4-9B or GLM-4-0414 checkpoint to a glm4-jax checkpoint (Orbax arrays + config + manifest +
tokenizer), which `glm4_jax.load(DST)` and `python -m glm4_jax.generate --ckpt DST` read with nothing else.

SRC is a local checkpoint directory in one of three layouts: the original THUDM one (model_type "chatglm"), the
transformers GlmForCausalLM one (model_type "glm"), or GLM-4-0414's Glm4ForCausalLM (model_type "glm4");
safetensors (one file, or shards with model.safetensors.index.json) or legacy pytorch_model*.bin shards (needs
torch; read with weights_only=True).
SRC may also be a Hugging Face hub repo id (org/name) when huggingface_hub is installed.

DST is claimed at the start (a new DST is created empty at once) and the output is written to a temporary sibling,
renamed onto DST at the end; on any error or Ctrl-C nothing is left behind. --force replaces only an empty directory
or a glm4-jax checkpoint (never the current or home directory), in one atomic swap. Temporaries that an earlier,
killed conversion left (.DST.tmp-*, .DST.old-*) are named, and removed when that is safe.
Tensors are read one block at a time, so memory does not grow with the model; disk space is checked first.
On bad input it prints one line `error: ...` naming the file or tensor, and exits with status 2.
"""

EPILOG = """\
examples:
  python -m glm4_jax.convert ~/models/glm-4-9b-chat ckpt/glm-4-9b-chat
  python -m glm4_jax.convert THUDM/glm-4-9b-chat-hf ckpt/glm-4-9b-chat --dtype float32 --force
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage dump
        _fail(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m glm4_jax.convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", nargs="?", help="source checkpoint directory (or hub repo id org/name)")
    p.add_argument("dst", metavar="DST", nargs="?", help="output directory; must not exist unless --force")
    p.add_argument(
        "--verify",
        metavar="DST",
        help="verify the converted checkpoint DST instead of converting (every chunk's crc32c, the metadata and "
        "the conversion id; as python -m glm4_jax.check DST)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert weights that hold NaN or Inf (by default they are refused, naming the tensor and index)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="dtype of the stored parameters (default: bfloat16, as GLM-4 ships)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANT_SCHEMES,
        help="store the matrices quantized: int8 (per output channel, about 10 GB for GLM-4-9B) or int4 (groups of "
        "--group-size along the input dimension, two values per byte, about 5.8 GB); the embedding, norms and "
        "biases stay in --dtype, which the scales take too (default: no quantization)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        metavar="N",
        help=f"int4: entries per scale along each matrix's input dimension (default {DEFAULT_GROUP_SIZE}); it must "
        "divide every input dimension",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DST that is a glm4-jax checkpoint or empty (only once the new one is complete)",
    )
    p.add_argument(
        "--no-hash",
        dest="hash",
        action="store_false",
        help="do not record the sha256 of the source files in manifest.json (saves a second read of the source "
        "and its hashing: a third of the time, measured on two cores)",
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "-q",
        "--quiet",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar (by default one is drawn when stderr is a terminal)",
    )
    bar.add_argument(
        "--progress", dest="progress", action="store_true", help="a progress bar even when stderr is not a terminal"
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when SRC is a repo id")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    args = p.parse_args(argv)
    if args.verify is not None:
        if args.src is not None:
            _fail("--verify DST takes no SRC or DST (see --help)")
    elif args.src is None or args.dst is None:
        _fail("SRC and DST are required (see --help)")
    return args


def _version() -> str:
    from glm4_jax.checkpoint import package_version

    return package_version()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The CLI; returns 0 on success, exits with status 2 (one `error:` line on stderr) on bad input."""
    args = parse_args(argv)
    if args.verify is not None:
        from glm4_jax.check import run

        return run(args.verify, args.progress)
    # Orbax logs warnings through absl (for example while a cancelled save winds down); the CLI's stderr is for
    # the progress bar and for one `error:` line.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from glm4_jax.config import ConfigError
    from glm4_jax.convert.pipeline import convert
    from glm4_jax.convert.readers import ConvertError
    from glm4_jax.fileio import PublishedInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    except ValueError:  # not the main thread
        previous = None
    try:
        dst = convert(
            args.src,
            args.dst,
            dtype=args.dtype,
            quantize=args.quantize,
            group_size=args.group_size,
            force=args.force,
            hash_files=args.hash,
            progress=args.progress,
            revision=args.revision,
            allow_nonfinite=args.allow_nonfinite,
        )
    except (ConvertError, ConfigError) as e:
        _fail(str(e))
    except PublishedInterrupt as e:
        _fail(f"interrupted after {e.dst} was written; the old checkpoint it replaced is left at {e.leftover}")
    except KeyboardInterrupt:
        _fail(f"interrupted; {args.dst} was not written (it is as it was)")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            where = os.path.dirname(os.path.abspath(args.dst))
            _fail(f"{args.dst}: no space left on the device of {where} while writing; nothing was written")
        _fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
    else:
        print(f"wrote {dst}", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    # One module, whatever imports it later: `import glm4_jax.convert.__main__` (the console script's entry point,
    # say) must not load this file a second time, with a second copy of anything defined here.
    sys.modules.setdefault("glm4_jax.convert.__main__", sys.modules[__name__])
    sys.exit(main())
