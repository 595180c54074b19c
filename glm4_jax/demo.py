"""`python -m glm4_jax.demo`: the whole pipeline on a tiny random GLM-4, in seconds on a CPU.

1. Writes a small random GLM-4 checkpoint in the original THUDM layout (`model_type` "chatglm" config.json,
   safetensors shards with an index, fused QKV and gate/up tensors, `[out, in]` matrices) plus a small synthetic
   `tokenizer.model` (`glm4_jax.fixtures`);
2. converts it with the real converter (`python -m glm4_jax.convert SRC DST`, called in-process);
3. loads the converted checkpoint (`glm4_jax.api.GLM4Chat.from_checkpoint`) and generates from it: one chat turn
   and one raw completion, streamed as they are produced.

The weights are random, so the text is gibberish; what the demo shows is that every stage runs and fits together.
`--out DIR` keeps the checkpoints (DIR/thudm, DIR/converted) for notebooks; the default is a temporary directory,
removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import shutil
import sys
import tempfile
import time

from glm4_jax.fixtures import convert_checkpoint, write_demo_source

REAL_MODEL = """\
To run the real GLM-4-9B-chat (about 19 GB in bfloat16), download THUDM/glm-4-9b-chat and:
  python -m glm4_jax.convert /path/to/glm-4-9b-chat out/glm-4-9b-chat
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --chat "What is JAX?"
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --mesh tensor=8 --chat "..."   # on 8 devices
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat                                  # interactive chat"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m glm4_jax.demo",
        description="Build a tiny random GLM-4 in the THUDM layout, convert it, and generate from it.",
    )
    p.add_argument("--out", metavar="DIR", help="keep the checkpoints in DIR (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (implied by --out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of sampling (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per generation (default 24)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")

    t0 = time.perf_counter()
    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="glm4-jax-demo-"))
    keep = bool(args.out) or args.keep
    try:
        src, dst = out / "thudm", out / "converted"
        # Paths are shown only when they are kept: a temporary directory is gone when the demo ends.
        where = f"to {src}" if keep else "to a temporary directory (removed at the end; --out DIR keeps it)"
        print(f"[1/3] writing a tiny random GLM-4 (THUDM layout) and a synthetic tokenizer {where}", flush=True)
        write_demo_source(src, seed=args.seed)
        shown = (src, dst) if keep else ("thudm", "converted")
        print(f"[2/3] converting it with `python -m glm4_jax.convert {shown[0]} {shown[1]}`", flush=True)
        said = io.StringIO()  # the converter's "wrote DST" names a path that is gone at the end, unless kept
        try:
            with contextlib.redirect_stderr(sys.stderr if keep else said):
                convert_checkpoint(src, dst)
        finally:
            sys.stderr.write(
                "" if keep else "".join(line for line in said.getvalue().splitlines(True) if "wrote" not in line)
            )
        from glm4_jax.api import GLM4Chat

        chat = GLM4Chat.from_checkpoint(dst)
        cfg = chat.cfg
        print(
            f"      {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} q / {cfg.num_kv_heads} kv heads,"
            f" {cfg.vocab_size} vocab rows ({chat.tokenizer.n_vocab} token ids), {cfg.dtype}"
        )
        print("[3/3] generating (random weights, so the text is gibberish)")
        question = "Hello, world! How are you today?"
        print(f"  chat  user> {question}\n  assistant> ", end="", flush=True)
        for piece in chat.chat(question, stream=True, max_new_tokens=args.max_new_tokens, seed=args.seed):
            print(piece, end="", flush=True)
        r = chat.last_result
        print(f"\n        [{len(r.ids[0])} tokens, stop: {r.stop_reasons[0]}, {r.decode_tok_s:.0f} tok/s]")
        prompt = "The quick brown fox"
        print(f"  raw prompt (greedy)> {prompt}", end="", flush=True)
        for piece in chat.stream(prompt, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        r = chat.last_result
        print(f"\n        [{len(r.ids[0])} tokens, stop: {r.stop_reasons[0]}, {r.decode_tok_s:.0f} tok/s]")
        print(f"done in {time.perf_counter() - t0:.1f} s.")
        if keep:
            print(f"The checkpoints are in {out}; try:\n  python -m glm4_jax.generate --ckpt {dst} --chat 'Hi there'")
        print(REAL_MODEL)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
