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
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

# Nothing here imports JAX at module level: the arguments are parsed and checked first, so that `--help` and a bad
# flag answer at once; JAX, the checkpoint and the engine are imported once they are needed.
from glm4_jax.config import DEFAULT_GROUP_SIZE, DTYPES, KV_CACHE_DTYPES, QUANT_SCHEMES, Config, np_dtype
from glm4_jax.options import (
    CACHE_ROUND,
    CHAT_DEFAULTS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    ArgumentParser,
    SamplingError,
    SamplingParams,
    UsageError,
    check_seed,
    truncate_left,
    turn_seed,
)

DESCRIPTION = """\
Generate text with a converted GLM-4 checkpoint (from `python -m glm4_jax.convert`).

  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --chat "What is JAX?"
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --prompt "The capital of France is" --max-new-tokens 16
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --prompt-ids 151331,151333,9703 --json
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat            # on a terminal: multi-turn chat

Modes: --chat TEXT (one user turn in the chat template, optional --system), --prompt TEXT (raw completion,
prefixed with [gMASK]<sop>), --prompt-ids (token ids as given, no tokenizer needed), or none of them on a
terminal: an interactive chat (keeps the history; /reset clears it, /help lists the commands, /exit or Ctrl-D
quits; Ctrl-C stops the reply being written and keeps the history).

Sampling defaults: chat (--chat and interactive) uses the official GLM-4-9B-chat demo settings, temperature 0.8
and top-p 0.8; --prompt and --prompt-ids default to greedy (temperature 0, top-p 1). Explicit flags override.
Generation stops at a stop id (the checkpoint config's eos_token_ids; for chat also <|endoftext|>, <|user|>,
<|observation|>), after --max-new-tokens, or when the KV cache (--max-len) is full. Ids of the padded vocabulary
rows (>= the tokenizer's n_vocab, 151343 for GLM-4) are never sampled.

Text is streamed to stdout as it is generated (a Python loop over the jitted decode step, never splitting a UTF-8
character); --no-stream runs the whole decode as one compiled lax.while_loop and prints at the end. Both give
the same tokens. Bad input gives a one-line `error: ...` on stderr and exit code 2.

Progress goes to stderr: one line per slow phase (loading the weights, compiling, prefilling), a progress bar
while the weights load, and one for a prompt of several prefill chunks when stderr is a terminal; -q silences
them. stdout holds only the generated text (and, with --json, the JSON line). --max-new-tokens larger than the
room left in the KV cache is lowered to it, with a note. Ctrl-C stops at any phase with exit status 130, the
text so far kept; a closed stdout (`| head`) ends the run quietly with status 141.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="PRNG seed, a 64-bit integer; the same seed gives the same tokens (default 0)",
    )
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
        "tokens (and the [gMASK]<sop> prefix) instead of failing; --prompt and --prompt-ids only (a --chat that long "
        "is refused: cutting it would drop its role tokens)",
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
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no status lines or progress bars on stderr (errors still show)"
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
    try:
        check_seed(args.seed)
    except ValueError as e:
        raise UsageError(f"--seed {e}") from None
    if args.mesh:
        from glm4_jax.sharding.mesh import parse_mesh_spec  # no JAX: the syntax only, the devices come later

        try:
            parse_mesh_spec(args.mesh, keep_rest=True)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None
    cluster = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in cluster) and not args.distributed:
        raise UsageError("--coordinator, --num-processes and --process-id need --distributed")


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
    if args.chat is not None:  # cutting a chat on the left would drop its role tokens: the model sees no roles
        raise UsageError(
            f"the chat prompt is {len(ids)} tokens, longer than {what} ({limit} tokens); --truncate-left applies to "
            "--prompt and --prompt-ids only (it would cut the chat template's role tokens): shorten --chat or "
            "--system, or raise --max-len"
        )
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


def _cap_new_tokens(n_prompt: int, args, cfg: Config, status: _Status) -> int:
    """--max-new-tokens, lowered (with a note) to what the KV cache has room for after a prompt of `n_prompt`
    tokens: each new token but the last takes a slot of the cache (--max-len, or the model's context)."""
    limit, what = (args.max_len, "--max-len") if args.max_len is not None else (cfg.max_seq_len, "the context")
    room = max(1, limit - n_prompt + 1)
    if args.max_new_tokens <= room:
        return args.max_new_tokens
    status.note(
        f"--max-new-tokens {args.max_new_tokens} lowered to {room}: the room left in the cache ({what} of {limit} "
        f"tokens, {n_prompt} taken by the prompt)"
    )
    return room


def _load_tokenizer(ckpt: str):
    from glm4_jax.tokenizer import TokenizerError
    from glm4_jax.tokenizer_json import load_tokenizer

    try:
        return load_tokenizer(ckpt)
    except (OSError, TokenizerError) as e:
        raise UsageError(f"--ckpt {ckpt}: cannot read its tokenizer: {e}") from None


def _load_model(args, mesh, progress: bool):
    from glm4_jax import checkpoint

    try:
        return checkpoint.load(
            args.ckpt,
            mesh=mesh,
            dtype=args.dtype,
            quantize=args.quantize,
            group_size=args.group_size,
            progress=progress,
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


# What each compiled function of the engine is, for the status lines (glm4_jax.engine.Generator._compiled).
_COMPILED_WHAT = {
    "prefill": "the prefill of a {}-token chunk",
    "start": "the first-token sampler",
    "step": "the decode step",
    "loop": "the decode loop",
}


class _Status:
    """Progress on stderr: one line per slow phase (loading, compiling, prefilling), and a tqdm bar for a prefill
    of several chunks when stderr is a terminal. Off under --quiet and on every process but 0."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.prompt_tokens = 0  # of the prompt being prefilled (the engine reports padded lengths)
        self.chunk = DEFAULT_PREFILL_CHUNK
        self.stream = True
        self.short_prefill = True  # a line for a prefill of one chunk too (off in the interactive chat)
        self._bar = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)  # above the bar, which stays
        else:
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.line(f"note: {text}")

    def engine(self, phase: str, *info) -> None:
        """`Generator.on_status`."""
        if phase == "compile":
            name, static = info
            self.line("compiling " + _COMPILED_WHAT.get(name, name).format(static))
        elif phase == "prefill":
            done, total = info
            if done == 0 and (self.short_prefill or total > self.chunk):
                self.line(f"prefilling {self.prompt_tokens:,} tokens")
                if self.enabled and total > self.chunk:
                    from tqdm import tqdm

                    self._bar = tqdm(
                        total=total, unit="tok", desc="prefill", file=sys.stderr, disable=None, dynamic_ncols=True
                    )
            elif self._bar is not None:
                self._bar.update(done - self._bar.n)
                if done >= total:
                    self._close_bar()
        elif phase == "decode" and not self.stream:
            self.line(f"decoding at most {info[0]:,} tokens in one compiled loop (the text comes at the end)")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Interrupts:
    """Ctrl-C and SIGTERM: exit status 130 within a second, at any phase, the text printed so far kept.

    The handler ends the process at once (`os._exit`: unwinding through XLA in the middle of a compilation, or
    the interpreter's shutdown with XLA's threads running, can crash). Only while `soft` is set and no load or
    compilation runs (the interactive chat's reply) does it raise KeyboardInterrupt instead, which stops the reply
    and keeps the session. Python runs a handler only between bytecodes, so while the main thread sits in one long
    call into XLA a watchdog thread, woken through the signal wakeup fd, ends the process when the handler has not
    run within GRACE_S."""

    GRACE_S = 0.75

    def __init__(self):
        self.soft = False
        self.busy = 0  # loads and compilations under way (Ctrl-C then always ends the process)
        self._cond = threading.Condition()
        self._handled = 0
        self._fds = None
        self._old = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._fds = (r, w)
        self._old = (
            signal.set_wakeup_fd(w, warn_on_full_buffer=False),
            signal.signal(signal.SIGINT, self._handler),
            signal.signal(signal.SIGTERM, self._handler),
        )
        threading.Thread(target=self._watch, args=(r,), name="interrupts", daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self._fds is not None:
            old_fd, old_int, old_term = self._old
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            os.close(self._fds[1])  # the watchdog's read returns and it ends
            self._fds = None

    @contextlib.contextmanager
    def hard(self):
        """A phase that Ctrl-C ends the process in, even in the chat (loading the weights)."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    def engine(self, phase: str, *info) -> None:
        """`Generator.on_status`: compilations are hard phases."""
        if phase == "compile":
            self.busy += 1
        elif phase == "compiled":
            self.busy -= 1

    def _handler(self, signum, frame):
        with self._cond:
            self._handled += 1
            self._cond.notify_all()
        if self.soft and not self.busy:
            raise KeyboardInterrupt
        _exit_now()

    def _watch(self, r: int) -> None:
        seen = 0
        try:
            while data := os.read(r, 64):
                seen += sum(1 for b in data if b in (signal.SIGINT, signal.SIGTERM))
                deadline = time.monotonic() + self.GRACE_S
                with self._cond:
                    while self._handled < seen:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            _exit_now()
                        self._cond.wait(left)
        finally:
            os.close(r)


def _exit_now(status: int = 130) -> None:
    """Ends the process at once: what was printed stays (stdout is flushed after every piece), nothing unwinds."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, b"\n")
    os._exit(status)


def _run_one(
    chat, ids: list[int], args, sampling, stop_ids, out: _Out, *, answer: bool = False, pieces: list | None = None
) -> tuple:
    """Generates for one prompt, streaming text (or ids, without a tokenizer) to stdout; returns (result, text).

    With `answer` (chat), the newline the model writes right after `<|assistant|>` is left out of the text.
    `pieces` collects the text as it is printed (what is left of a reply that Ctrl-C stopped)."""
    pieces = [] if pieces is None else pieces
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
        pieces.append(text)
        out.write(text)
    else:
        for piece in chat.stream_text(ids, answer=answer, **kw):
            pieces.append(piece)
            out.write(piece)
        res = chat.last_result
        text = res.texts[0].removeprefix("\n") if answer else res.texts[0]
    out.write("\n")
    return res, text


CHAT_HELP = """\
/reset  clear the history (keeps --system)
/help   this list
/exit   quit (also /quit, or Ctrl-D)
Ctrl-C stops the reply being written; the history keeps the part written so far."""


def _interactive(chat, args, out: _Out, status: _Status, interrupts: _Interrupts) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    tok = chat.tokenizer
    initial = [{"role": "system", "content": args.system}] if args.system else []
    history = list(initial)
    sampling = _sampling(args, chat=True)
    stop_ids = chat.chat_stop_ids()
    status.short_prefill = False  # one line per turn would be noise: only prompts of several chunks get one
    interrupts.soft = True  # Ctrl-C stops a reply, not the session (but still ends a compilation)
    print(f"GLM-4 chat ({args.ckpt}). /reset clears the history, /help lists the commands, /exit quits.", flush=True)
    turn = 0
    while True:
        try:
            line = input("\nuser> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history = list(initial)
            print("(history cleared)")
            continue
        if command == "/help":
            print(CHAT_HELP)
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history)
        try:
            ids = _fit_prompt(ids, args, chat.cfg, tok.prefix_ids)
        except UsageError as e:
            history.pop()
            print(f"error: {e}; /reset to start over", file=sys.stderr)
            continue
        status.prompt_tokens = len(ids)
        n_new = _cap_new_tokens(len(ids), args, chat.cfg, status)
        sys.stdout.write("assistant> ")
        run_args = argparse.Namespace(**{**vars(args), "seed": turn_seed(args.seed, turn), "max_new_tokens": n_new})
        pieces: list[str] = []
        try:
            _, text = _run_one(chat, ids, run_args, sampling, stop_ids, out, answer=True, pieces=pieces)
        except KeyboardInterrupt:
            text = "".join(pieces)
            print("\n(stopped)")
        history.append({"role": "assistant", "content": text})
        turn += 1


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see `--help`). Returns 0; bad input raises SystemExit(2) after a one-line `error: ...`, Ctrl-C
    SystemExit(130), a closed stdout SystemExit(141)."""
    try:
        args = build_parser().parse_args(argv)
        _validate(args)  # before JAX is imported
        with _Interrupts() as interrupts:
            return _main(args, interrupts)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # The reader went away (`| head`): no traceback, and no second error when Python flushes stdout at exit.
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def _main(args, interrupts: _Interrupts) -> int:
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
    # Before anything touches a device. Without the flag, a multi-host TPU VM slice still joins (auto-detected).
    try:
        sharding.initialize_distributed(True if args.distributed else None, **cluster)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--distributed: {' '.join(str(e).split())}") from None
    cfg = _load_config(args.ckpt)
    if args.quantize and cfg.quant:
        raise UsageError(f"--ckpt {args.ckpt}: the checkpoint is quantized already ({cfg.quant}); drop --quantize")
    stored = cfg  # the arrays the model will hold: quantized while loading with --quantize
    if args.quantize:
        try:
            stored = cfg.replace(quant=args.quantize, group_size=args.group_size)
        except ValueError as e:  # ConfigError: a group size that does not divide a matrix
            raise UsageError(f"--group-size: {e}") from None
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

    import jax

    first = jax.process_index() == 0
    status = _Status(first and not args.quiet)
    status.chunk, status.stream = args.prefill_chunk, not args.no_stream
    if ids is not None:
        args.max_new_tokens = _cap_new_tokens(len(ids), args, cfg, status)
    dtype = args.dtype or cfg.dtype
    target = stored.replace(dtype=dtype)
    size = sum(math.prod(shape) * np_dtype(dt).itemsize for shape, _, dt in target.stored_layout().values())
    where = f"over a mesh of {mesh.size} devices" if mesh is not None else "on one device"
    amount = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    what = f"{dtype}" if target.quant is None else f"{target.quant} ({dtype} scales and norms)"
    verb = "loading and quantizing" if args.quantize else "loading"
    status.line(f"{verb} {amount} of {what} weights from {args.ckpt} {where}")
    with interrupts.hard():
        model = _load_model(args, mesh, progress=status.enabled)
    from glm4_jax.api import GLM4Chat
    from glm4_jax.engine import GenerationError

    chat = GLM4Chat(model, tok, mesh=mesh, prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache)
    chat.generator.on_status = lambda *event: (interrupts.engine(*event), status.engine(*event))
    out = _Out(first)
    if interactive:
        _interactive(chat, args, out, status, interrupts)
        return 0

    status.prompt_tokens = len(ids)
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
    # One module, whatever imports it later: `import glm4_jax.generate` must not load this file a second time
    # (its exception classes would then be two different classes).
    sys.modules.setdefault("glm4_jax.generate", sys.modules[__name__])
    try:
        status = main()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    # Out without the interpreter's shutdown, which can crash while XLA's threads still run after a Ctrl-C.
    if status == 130:
        _exit_now(status)
    sys.exit(status)
