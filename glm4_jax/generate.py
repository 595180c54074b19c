"""`python -m glm4_jax.generate`: generate text with a converted checkpoint, streamed to the terminal.

The command line only: the arguments, the checks of bad input (a one-line `error: ...` and exit code 2), the
interactive chat and the output. Generation itself is `glm4_jax.api.GLM4Chat` on the engine in
`glm4_jax.engine`; the options and defaults are documented in `--help` (see `build_parser`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax

from glm4_jax.config import DEFAULT_GROUP_SIZE, DTYPES, KV_CACHE_DTYPES, QUANT_SCHEMES, Config
from glm4_jax.engine import CACHE_ROUND, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PREFILL_CHUNK, GenerationError, truncate_left
from glm4_jax.sampling import CHAT_DEFAULTS, SamplingError, SamplingParams


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        raise UsageError(f"{message} (see --help)")


class UsageError(Exception):
    """Bad input to the CLI: printed as `error: ...` on stderr, exit code 2."""


DESCRIPTION = """\
Generate text with a converted GLM-4 checkpoint (from `python -m glm4_jax.convert`).

  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --chat "What is JAX?"
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --prompt "The capital of France is" --max-new-tokens 16
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --prompt-ids 151331,151333,9703 --json
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat            # on a terminal: multi-turn chat

Modes: --chat TEXT (one user turn in the chat template, optional --system), --prompt TEXT (raw completion,
prefixed with [gMASK]<sop>), --prompt-ids (token ids as given, no tokenizer needed), or none of them on a
terminal: an interactive chat (keeps the history; /reset clears it, /exit or Ctrl-D quits).

Sampling defaults: chat (--chat and interactive) uses the official GLM-4-9B-chat demo settings, temperature 0.8
and top-p 0.8; --prompt and --prompt-ids default to greedy (temperature 0, top-p 1). Explicit flags override.
Generation stops at a stop id (the checkpoint config's eos_token_ids; for chat also <|endoftext|>, <|user|>,
<|observation|>), after --max-new-tokens, or when the KV cache (--max-len) is full. Ids of the padded vocabulary
rows (>= the tokenizer's n_vocab, 151343 for GLM-4) are never sampled.

Text is streamed to stdout as it is generated (a Python loop over the jitted decode step, never splitting a UTF-8
character); --no-stream runs the whole decode as one compiled lax.while_loop and prints at the end. Both give
the same tokens. Bad input gives a one-line `error: ...` on stderr and exit code 2.
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m glm4_jax.generate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="DIR", help="converted checkpoint directory (required)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", metavar="TEXT", help="raw completion prompt; gets the [gMASK]<sop> prefix")
    mode.add_argument("--chat", metavar="TEXT", help="one user turn, in the GLM-4 chat template")
    mode.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, used as given (e.g. 1,2,3)")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat and interactive chat (default none)")
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"tokens to generate at most, >= 1 (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    g.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help=f"0 means greedy; >= 0 (default {CHAT_DEFAULTS.temperature} for chat, 0 for --prompt/--prompt-ids)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help=f"nucleus sampling, in (0, 1]; 1 is off (default {CHAT_DEFAULTS.top_p} for chat, 1 otherwise)",
    )
    g.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="keep the K most likely ids, >= 0; 0 is off (default 0)"
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        metavar="R",
        help="divide positive / multiply negative logits of ids already in the prompt or output by R, > 0; "
        "1 is off (default 1; some GLM-4 demos use 1.2)",
    )
    g.add_argument("--seed", type=int, default=0, help="PRNG seed; the same seed gives the same tokens (default 0)")
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--dtype",
        choices=DTYPES,
        help="compute dtype (default: the checkpoint's own, so a float32 checkpoint runs in float32)",
    )
    r.add_argument(
        "--quantize",
        choices=QUANT_SCHEMES,
        help="quantize the matrices of an unquantized checkpoint while loading: int8 (about 10 GB for GLM-4-9B) "
        "or int4 (about 5.8 GB); a checkpoint converted with --quantize needs nothing here (default: as stored)",
    )
    r.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        metavar="N",
        help=f"with --quantize int4: entries per scale along the input dimension (default {DEFAULT_GROUP_SIZE})",
    )
    r.add_argument(
        "--kv-cache",
        choices=KV_CACHE_DTYPES,
        help="KV cache dtype; int8 (one scale per token and kv head) takes half the memory of bfloat16, so twice "
        "the context fits (default: the compute dtype)",
    )
    r.add_argument(
        "--mesh",
        metavar="SPEC",
        help="device mesh, e.g. data=1,fsdp=1,tensor=8,sequence=1 (axes data, fsdp, tensor, sequence; one may be "
        "-1 for the remaining devices). Default: no mesh, one device",
    )
    r.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run with jax.distributed.initialize() before anything else: run the same command on "
        "every host. Cloud TPU VMs, Slurm and Open MPI are detected; elsewhere give --coordinator, --num-processes "
        "and --process-id. On a multi-host TPU VM slice this happens even without the flag",
    )
    r.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: the address of process 0")
    r.add_argument("--num-processes", type=int, metavar="N", help="with --distributed: the number of processes")
    r.add_argument("--process-id", type=int, metavar="I", help="with --distributed: this process's index, 0..N-1")
    r.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help="KV cache length in tokens (default: prompt + max-new-tokens rounded up to a multiple of "
        f"{CACHE_ROUND}, at most the model's context); generation stops when it is full",
    )
    r.add_argument(
        "--truncate-left",
        action="store_true",
        help="when the prompt is longer than the context (or --max-len), keep its last (context - max-new-tokens) "
        "tokens (and the [gMASK]<sop> prefix) instead of failing",
    )
    r.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help=f"prompt tokens per prefill step (default {DEFAULT_PREFILL_CHUNK})",
    )
    r.add_argument("--no-stream", action="store_true", help="run the compiled while-loop; print the text at the end")
    r.add_argument(
        "--json",
        action="store_true",
        help="after the text, print one JSON object as the last line of stdout: ids (generated, prompt excluded, "
        "stop id included), text, prompt_tokens, stop_reason, prefill_s, decode_s, decode_tok_s, compile_s, ...",
    )
    return p


def _parse_ids(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",")]
    if not any(parts):
        raise UsageError("empty prompt: --prompt-ids has no ids")
    try:
        ids = [int(t) for t in parts if t]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise UsageError("--prompt-ids: token ids must be >= 0")
    return ids


def _validate(args) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _sampling(args, chat=False)  # the ranges of the sampling flags (SamplingParams checks them)
    if args.max_len is not None and args.max_len < 1:
        raise UsageError(f"--max-len must be >= 1, got {args.max_len}")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    for flag, text in (("--prompt", args.prompt), ("--chat", args.chat)):
        if text is not None and not text.strip():
            raise UsageError(f"empty prompt: {flag} is empty")
    if args.system is not None and (args.prompt is not None or args.prompt_ids is not None):
        raise UsageError("--system applies to --chat and interactive chat only")


def _sampling(args, chat: bool) -> SamplingParams:
    """The sampling settings of the flags, the chat or raw-prompt defaults filling in what is not given."""
    base = CHAT_DEFAULTS if chat else SamplingParams()
    try:
        return SamplingParams(
            temperature=base.temperature if args.temperature is None else args.temperature,
            top_p=base.top_p if args.top_p is None else args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
        )
    except SamplingError as e:
        raise UsageError(f"--{e.field.replace('_', '-')}{str(e)[len(e.field) :]}") from None


def _fit_prompt(ids: list[int], args, cfg: Config, prefix: Sequence[int]) -> list[int]:
    """Checks the prompt length against the context (or --max-len); truncates on the left with --truncate-left."""
    limit, what = (args.max_len, "--max-len") if args.max_len is not None else (cfg.max_seq_len, "the model's context")
    if len(ids) <= limit:
        return ids
    if not args.truncate_left:
        raise UsageError(
            f"the prompt is {len(ids)} tokens, longer than {what} ({limit} tokens); pass --truncate-left to keep "
            f"its last {max(1, limit - args.max_new_tokens)} tokens"
        )
    return truncate_left(ids, max(1, limit - args.max_new_tokens), prefix)


def _load_config(ckpt: str) -> Config:
    """The checkpoint's config, after checking the directory is a complete converted checkpoint (no array data
    is read)."""
    from glm4_jax import checkpoint

    if not os.path.isdir(ckpt):
        raise UsageError(f"--ckpt {ckpt}: no such directory")
    try:
        cfg, _ = checkpoint.check(ckpt)
    except (OSError, ValueError) as e:  # CheckpointError and ConfigError are ValueErrors
        raise UsageError(f"--ckpt {ckpt}: {e}".replace("\n", " ")) from None
    return cfg


def _load_tokenizer(ckpt: str):
    from glm4_jax.api import load_tokenizer
    from glm4_jax.tokenizer import TokenizerError

    try:
        return load_tokenizer(ckpt)
    except (OSError, TokenizerError) as e:
        raise UsageError(f"--ckpt {ckpt}: cannot read its tokenizer: {e}") from None


def _load_model(args, mesh):
    from glm4_jax import checkpoint

    try:
        return checkpoint.load(
            args.ckpt, mesh=mesh, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size
        )
    except (OSError, ValueError) as e:  # CheckpointError, ConfigError and ShardingError are ValueErrors
        raise UsageError(f"--ckpt {args.ckpt}: {e}".replace("\n", " ")) from None


class _Out:
    """stdout for process 0 only (multi-host runs print once)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def write(self, text: str) -> None:
        if self.enabled and text:
            sys.stdout.write(text)
            sys.stdout.flush()


def _run_one(chat, ids: list[int], args, sampling, stop_ids, out: _Out, *, answer: bool = False) -> tuple:
    """Generates for one prompt, streaming text (or ids, without a tokenizer) to stdout; returns (result, text).

    With `answer` (chat), the newline the model writes right after `<|assistant|>` is left out of the text."""
    kw = dict(
        max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stop_ids=stop_ids, max_len=args.max_len
    )
    if chat.tokenizer is None:  # ids in, ids out
        if args.no_stream:
            res = chat.generator.generate([ids], **kw)
            out.write(" ".join(map(str, res.ids[0])))
        else:
            for t in chat.stream_tokens(ids, **kw):
                out.write(f"{t} ")
            res = chat.last_result
        out.write("\n")
        return res, ""
    if args.no_stream:
        res, text = chat.complete_ids(ids, answer=answer, **kw)
        out.write(text)
    else:
        for piece in chat.stream_text(ids, answer=answer, **kw):
            out.write(piece)
        res = chat.last_result
        text = res.texts[0].removeprefix("\n") if answer else res.texts[0]
    out.write("\n")
    return res, text


def _interactive(chat, args, out: _Out) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    tok = chat.tokenizer
    initial = [{"role": "system", "content": args.system}] if args.system else []
    history = list(initial)
    sampling = _sampling(args, chat=True)
    stop_ids = chat.chat_stop_ids()
    print(f"GLM-4 chat ({args.ckpt}). /reset clears the history, /exit quits.", flush=True)
    turn = 0
    while True:
        try:
            line = input("\nuser> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history = list(initial)
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history)
        try:
            ids = _fit_prompt(ids, args, chat.cfg, tok.prefix_ids)
        except UsageError as e:
            history.pop()
            print(f"error: {e}; /reset to start over", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        run_args = argparse.Namespace(**{**vars(args), "seed": args.seed + turn})
        _, text = _run_one(chat, ids, run_args, sampling, stop_ids, out, answer=True)
        history.append({"role": "assistant", "content": text})
        turn += 1


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see `--help`). Returns 0; bad input raises SystemExit(2) after a one-line `error: ...`."""
    try:
        return _main(build_parser().parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


def _main(args) -> int:
    _validate(args)
    prompt_ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    interactive = args.prompt is None and args.chat is None and prompt_ids is None
    if interactive and not sys.stdin.isatty():
        raise UsageError("no prompt: give --chat, --prompt or --prompt-ids (interactive chat needs a terminal)")
    if interactive and args.distributed:
        raise UsageError("interactive chat does not run with --distributed; give --chat, --prompt or --prompt-ids")

    from glm4_jax import sharding

    cluster = {
        k: v
        for k, v in (
            ("coordinator_address", args.coordinator),
            ("num_processes", args.num_processes),
            ("process_id", args.process_id),
        )
        if v is not None
    }
    if cluster and not args.distributed:
        raise UsageError("--coordinator, --num-processes and --process-id need --distributed")
    # Before anything touches a device. Without the flag, a multi-host TPU VM slice still joins (auto-detected).
    sharding.initialize_distributed(True if args.distributed else None, **cluster)
    cfg = _load_config(args.ckpt)
    if args.max_len is not None and args.max_len > cfg.max_seq_len:
        raise UsageError(f"--max-len {args.max_len} exceeds the model's context of {cfg.max_seq_len} tokens")
    tok = _load_tokenizer(args.ckpt)
    if tok is None and prompt_ids is None:
        flag = "--prompt" if args.prompt is not None else "--chat" if args.chat is not None else "interactive chat"
        raise UsageError(
            f"{flag} needs a tokenizer, but {args.ckpt} has no tokenizer.model or tokenizer.json (use --prompt-ids, "
            "or convert from a directory that has one)"
        )
    if prompt_ids is not None:
        bad = [i for i in prompt_ids if i >= cfg.vocab_size]
        if bad:
            raise UsageError(f"--prompt-ids: id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")

    chat_mode = args.chat is not None or interactive
    if args.prompt is not None:
        ids = tok.encode_prompt(args.prompt)
    elif args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
        ids = tok.apply_chat_template(messages)
    else:
        ids = prompt_ids
    if ids is not None:
        ids = _fit_prompt(ids, args, cfg, tok.prefix_ids if tok else ())

    mesh = None
    if args.mesh:
        try:
            mesh = sharding.make_mesh(args.mesh)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None

    model = _load_model(args, mesh)
    from glm4_jax.api import GLM4Chat

    chat = GLM4Chat(model, tok, mesh=mesh, prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache)
    out = _Out(jax.process_index() == 0)
    if interactive:
        _interactive(chat, args, out)
        return 0

    sampling = _sampling(args, chat=chat_mode)
    stop_ids = chat.chat_stop_ids() if chat_mode else None
    try:
        res, text = _run_one(chat, ids, args, sampling, stop_ids, out, answer=args.chat is not None)
    except (GenerationError, sharding.ShardingError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        record = {
            "ids": res.ids[0],
            "text": text,
            "prompt_tokens": res.prompt_tokens[0],
            "new_tokens": len(res.ids[0]),
            "stop_reason": res.stop_reasons[0],
            "prefill_s": round(res.prefill_s, 6),
            "decode_s": round(res.decode_s, 6),
            "decode_tok_s": round(res.decode_tok_s, 3),
            "compile_s": round(res.compile_s, 6),
            "mode": "stream" if res.streamed else "compiled",
            "max_len": res.max_len,
            "dtype": str(chat.generator.dtype),
            "seed": args.seed,
            "sampling": dataclasses.asdict(sampling),
        }
        out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
