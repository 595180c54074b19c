"""`python -m glm4_jax.serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.

    python -m glm4_jax.serve --ckpt out/glm-4-9b-chat --port 8000 --max-batch 8

Endpoints: `GET /health` (503 until the model is loaded and the engine's executables are compiled, and again
while shutting down), `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE,
ending with `data: [DONE]`) or not. The HTTP side is FastAPI on uvicorn; generation is `glm4_jax.batching.Engine`
on a thread of its own: every choice of every request is one engine request, whose per-token callbacks (on the
engine thread) are handed to the request's event loop.

Text: a completion prompt is encoded as `generate --prompt` encodes it (`[gMASK]<sop>` + the text's tokens), a
chat as the GLM-4 chat template does (`Tokenizer.apply_chat_template`, tools included), so greedy outputs agree
with the CLI. Stop strings cut the text at the first one; a streamed reply holds back text that could be the start
of one. Log-probabilities are those of the distribution the sampler draws from (`glm4_jax.batching._logprobs`);
`echo` with `logprobs` on completions scores the prompt with a separate forward pass (the model's distribution).

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field (named in
`param`), 400 `context_length_exceeded` for a prompt and budget longer than the cache, 401 for a wrong or missing
key with `--api-key`, 404 for an unknown model, 429 with `Retry-After` when the queue is full, 503 while starting
or draining. A client that disconnects cancels its request at the engine's next step. SIGTERM (or Ctrl-C) stops
admitting (the server keeps listening meanwhile and answers new requests 503), lets running requests finish for
`--shutdown-timeout` seconds, cancels what is left (their `finish_reason` is "length": only OpenAI's values are
used), and exits 0; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

# As in generate.py: no JAX at module level, so `--help` and bad flags answer at once.
from starlette.requests import Request  # the handlers' annotation (FastAPI reads it from this module)

from glm4_jax.config import DEFAULT_GROUP_SIZE, DTYPES, QUANT_SCHEMES
from glm4_jax.options import DEFAULT_PREFILL_CHUNK, SEED_MAX, SEED_MIN, ArgumentParser, UsageError

TOP_LOGPROBS = 20  # == glm4_jax.batching.TOP_LOGPROBS (not imported here: it imports JAX)
MAX_STOP_STRINGS = 16
DEFAULT_MAX_LEN = 8192  # cache slots per decode row unless --max-len (at most the model's context)
NEG_INF_LOGPROB = -9999.0  # JSON has no -inf: ids the sampler can never choose


DESCRIPTION = """\
Serve a converted GLM-4 checkpoint over an OpenAI-compatible HTTP API (chat and text completions, streaming,
tool calls, log-probabilities), on the continuous-batching engine.

  python -m glm4_jax.serve --ckpt out/glm-4-9b-chat --port 8000
  python -m glm4_jax.serve --ckpt out/glm-4-9b-chat --mesh tensor=8 --max-batch 32 --api-key sk-local

It binds 127.0.0.1 unless --host says otherwise. GET /health answers 200 once the model is loaded and compiled.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m glm4_jax.serve", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--ckpt", required=True, metavar="DIR", help="converted checkpoint directory (required)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients send (default the checkpoint's name)")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1 (default none)")
    r = p.add_argument_group("engine")
    r.add_argument("--mesh", metavar="SPEC", help="device mesh, e.g. tensor=8 or fsdp=2,tensor=4 (default one device)")
    r.add_argument("--max-batch", type=int, default=8, metavar="N", help="decode slots: requests running at once")
    r.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help=f"cache slots per request, prompt plus new tokens (default the context, at most {DEFAULT_MAX_LEN})",
    )
    r.add_argument(
        "--max-queue", type=int, default=64, metavar="N", help="requests waiting for a slot before 429 (default 64)"
    )
    r.add_argument("--quantize", choices=QUANT_SCHEMES, help="quantize the weights while loading")
    r.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size")
    r.add_argument("--dtype", choices=DTYPES, help="compute dtype (default the checkpoint's)")
    r.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N", help="prefill chunk")
    r.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM, seconds running requests may take before they are cancelled (default 10)",
    )
    r.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _validate(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_len is not None and args.max_len < 2:
        raise UsageError(f"--max-len must be >= 2, got {args.max_len}")
    if not args.shutdown_timeout >= 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.group_size < 1:
        raise UsageError(f"--group-size must be >= 1, got {args.group_size}")
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key is empty")
    if not os.path.isdir(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt}: no such directory")


# ---- errors ----------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(status, "server_error")
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


# ---- request checks (plain checks on the parsed JSON: every bad field is named) ---------------------------------


def _get(body: dict, key: str, kinds, default=None, *, check=None, what: str = ""):
    """body[key] if present and not None, of one of `kinds` (bool is never an int), passing `check`."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise _bad(key, f"must be {what or kinds[0].__name__}, got a boolean")
    if not isinstance(value, kinds):
        raise _bad(key, f"must be {what or kinds[0].__name__}, got {type(value).__name__}")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if check is not None and not check(value):
        raise _bad(key, f"{what} out of range, got {value!r}")
    return value


class Params:
    """The settings shared by both endpoints, checked."""

    def __init__(self, body: dict, *, chat: bool):
        self.model = body.get("model")
        if not isinstance(self.model, str) or not self.model:
            raise _bad("model", "a model id (string) is required")
        self.stream = _get(body, "stream", (bool,), False, what="a boolean")
        opts = _get(body, "stream_options", (dict,), {}, what="an object")
        if opts and not self.stream:
            raise _bad("stream_options", "is only allowed with stream: true")
        self.include_usage = bool(_get(opts, "include_usage", (bool,), False, what="a boolean"))
        self.n = _get(body, "n", (int,), 1, check=lambda v: 1 <= v <= 128, what="an integer in [1, 128]")
        self.temperature = _get(
            body, "temperature", (float, int), 1.0, check=lambda v: 0 <= v <= 2, what="a number in [0, 2]"
        )
        self.top_p = _get(body, "top_p", (float, int), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]")
        self.top_k = _get(body, "top_k", (int,), 0, check=lambda v: v >= 0, what="an integer >= 0")
        self.repetition_penalty = _get(
            body, "repetition_penalty", (float, int), 1.0, check=lambda v: 0 < v <= 10, what="a number in (0, 10]"
        )
        for key in ("frequency_penalty", "presence_penalty"):
            if _get(body, key, (float, int), 0.0, what="a number") != 0:
                raise _bad(key, "is not supported (only 0); use repetition_penalty")
        if body.get("logit_bias"):
            raise _bad("logit_bias", "is not supported")
        seed = _get(body, "seed", (int,), None, check=lambda v: SEED_MIN <= v <= SEED_MAX, what="a 64-bit integer")
        self.seed = secrets.randbits(62) if seed is None else seed
        _get(body, "user", (str,), None, what="a string")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "must be a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        self.stop = [s for s in stop if s]
        if chat:
            max_tokens = _get(body, "max_completion_tokens", (int,), None, what="an integer")
            key = "max_completion_tokens"
            if max_tokens is None:
                max_tokens, key = _get(body, "max_tokens", (int,), None, what="an integer"), "max_tokens"
            if max_tokens is not None and max_tokens < 1:
                raise _bad(key, f"must be >= 1, got {max_tokens}")
            want = _get(body, "logprobs", (bool,), False, what="a boolean")
            top = _get(body, "top_logprobs", (int,), None, what="an integer")
            if top is not None and not 0 <= top <= TOP_LOGPROBS:
                raise _bad("top_logprobs", f"must be in [0, {TOP_LOGPROBS}], got {top}")
            if top is not None and not want:
                raise _bad("top_logprobs", "needs logprobs: true")
            self.logprobs = (top or 0) if want else None
            self.echo = False
        else:
            key = "max_tokens"
            max_tokens = _get(body, "max_tokens", (int,), 16, what="an integer")
            self.echo = _get(body, "echo", (bool,), False, what="a boolean")
            if max_tokens < (0 if self.echo else 1):
                raise _bad("max_tokens", f"must be >= {0 if self.echo else 1}, got {max_tokens}")
            self.logprobs = _get(body, "logprobs", (int,), None, what="an integer")
            if self.logprobs is not None and not 0 <= self.logprobs <= TOP_LOGPROBS:
                raise _bad("logprobs", f"must be in [0, {TOP_LOGPROBS}], got {self.logprobs}")
            if body.get("suffix"):
                raise _bad("suffix", "is not supported")
            best_of = _get(body, "best_of", (int,), None, what="an integer")
            if best_of is not None and best_of != self.n:
                raise _bad("best_of", "is not supported (only equal to n)")
            if max_tokens == 0 and self.stream:
                raise _bad("max_tokens", "0 (scoring only) cannot be streamed")
        self.max_tokens, self.max_tokens_key = max_tokens, key


def _completion_prompts(body: dict) -> list:
    """The prompts of /v1/completions: a string, a list of strings, a list of ids or a list of id lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
            return [list(x) for x in p]
    raise _bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of id lists")


# ---- text of one choice: stop strings, hold-back, log-probabilities -----------------------------------------------


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Choice:
    """The text of one choice as its ids come: decoded, cut at a stop string, released as it becomes final."""

    def __init__(self, svc: Service, index: int, p: Params, *, chat: bool, stop_ids: set[int]):
        self.svc, self.index, self.p, self.chat, self.stop_ids = svc, index, p, chat, stop_ids
        self.decoder = svc.tok.stream_decoder()
        self.text = ""  # decoded so far (cut at a stop string)
        self.sent = 0  # characters released
        self.lp_sent = 0  # log-probability entries released
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.n_tokens = 0
        self.finish: str | None = None
        self.request = None
        self.first = chat  # strip the newline the model writes after <|assistant|>

    def feed(self, tok: int, lp) -> None:
        if self.finish is not None:
            return
        self.n_tokens += 1
        if lp is not None and not (self.chat and tok in self.stop_ids):
            self.logprobs.append((tok, lp[0], lp[1]))
        if tok in self.stop_ids:
            return
        piece = self.decoder.feed(tok)
        self._add(piece)

    def _add(self, piece: str) -> None:
        if self.first and piece:
            piece, self.first = piece.removeprefix("\n"), False
        if not piece:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.p.stop), default=0))
        self.text += piece
        cut = [i for i in (self.text.find(s, start) for s in self.p.stop) if i >= 0]
        if cut:
            self.text = self.text[: min(cut)]
            self.finish = "stop"
            if self.request is not None:
                self.svc.engine.cancel(self.request)

    def done(self, reason: str) -> None:
        if self.finish is None:
            self._add(self.decoder.flush())
        if self.finish is None:
            # OpenAI's values only: a request cut short by the server (cancelled when a drain timed out; a client
            # that disconnected never reads it) reports "length", the value for output that ended before its end.
            self.finish = "stop" if reason == "stop_id" else "length"

    def release(self) -> str:
        """The text that is final now (all of it once finished)."""
        end = len(self.text) if self.finish is not None else len(self.text) - _held(self.text, self.p.stop)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def release_logprobs(self):
        out = self.logprobs[self.lp_sent :]
        self.lp_sent = len(self.logprobs)
        return out


def _lp(v: float) -> float:
    return v if v > NEG_INF_LOGPROB else NEG_INF_LOGPROB


# ---- the service: model, tokenizer, engine thread, admission ------------------------------------------------------


class Service:
    """The engine on its own thread, and what the HTTP handlers need of it."""

    def __init__(self, args):
        self.args = args
        self.ready = False
        self.draining = False
        self.failed: str | None = None
        self.lock = threading.Lock()
        self.inflight = 0  # engine requests admitted and not ended
        self.stats = {"cancelled": 0, "finished": 0}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.created = int(time.time())
        self._live: set = set()  # engine requests running (cancelled when a drain times out)

    # -- loading (on the main thread, before the HTTP server starts)

    def load(self) -> None:
        args = self.args
        from glm4_jax import checkpoint, sharding
        from glm4_jax.tokenizer import TokenizerError
        from glm4_jax.tokenizer_json import load_tokenizer

        try:
            cfg, _ = checkpoint.check(args.ckpt)
        except (OSError, ValueError) as e:
            raise UsageError(f"--ckpt {args.ckpt}: {e}".replace("\n", " ")) from None
        if args.quantize and cfg.quant:
            raise UsageError(f"--ckpt {args.ckpt}: the checkpoint is quantized already ({cfg.quant}); drop --quantize")
        if args.max_len is not None and args.max_len > cfg.max_seq_len:
            raise UsageError(f"--max-len {args.max_len} exceeds the model's context of {cfg.max_seq_len} tokens")
        try:
            self.tok = load_tokenizer(args.ckpt)
        except (OSError, TokenizerError) as e:
            raise UsageError(f"--ckpt {args.ckpt}: cannot read its tokenizer: {e}") from None
        if self.tok is None:
            raise UsageError(f"--ckpt {args.ckpt}: has no tokenizer.model or tokenizer.json; the server needs one")
        mesh = None
        if args.mesh:
            try:
                mesh = sharding.make_mesh(args.mesh)
            except ValueError as e:
                raise UsageError(f"--mesh: {e}") from None
        try:
            model = checkpoint.load(
                args.ckpt, mesh=mesh, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size
            )
        except (OSError, ValueError) as e:
            raise UsageError(f"--ckpt {args.ckpt}: {e}".replace("\n", " ")) from None
        from glm4_jax.batching import Engine
        from glm4_jax.engine import GenerationError

        self.cfg = cfg
        self.max_len = args.max_len or min(cfg.max_seq_len, DEFAULT_MAX_LEN)
        try:
            self.engine = Engine(
                model,
                slots=args.max_batch,
                max_len=self.max_len,
                n_vocab=self.tok.n_vocab,
                prefill_chunk=args.prefill_chunk,
                mesh=mesh,
            )
        except (GenerationError, sharding.ShardingError) as e:
            raise UsageError(str(e)) from None
        self.model_name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
        self.eos_ids = set(cfg.eos_token_ids)
        self.chat_stop_ids = self.eos_ids | set(self.tok.stop_ids)
        self.capacity = args.max_batch + args.max_queue
        self._scorers: dict = {}

    def start(self) -> None:
        """Starts the engine thread and warms it up: every prefill bucket, the insert and the decode step."""
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()
        from glm4_jax.engine import prefill_chunks

        chunk, top = self.args.prefill_chunk, self.max_len - 2
        lengths = sorted({min(sum(prefill_chunks(1 << i, chunk)), top) for i in range(chunk.bit_length() + 1)})
        reqs = [self.engine.submit([0] * n, max_new_tokens=2, logprobs=1, seed=0) for n in lengths]
        for r in reqs:
            while not r.wait(1.0):
                if self.failed:
                    raise RuntimeError(self.failed)
        self.ready = True

    def _run(self) -> None:
        try:
            self.engine.run_forever(self.stop)
        except BaseException as e:  # the engine is broken: answer 503, never hang
            self.failed = f"the engine stopped: {type(e).__name__}: {e}"
            self.ready = False
            print(f"error: {self.failed}", file=sys.stderr, flush=True)

    def shutdown(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def drain(self, timeout: float, then: Callable[[], None] | None = None) -> None:
        """Stops admitting (the server keeps listening and answers new requests 503); after `timeout` seconds
        cancels every request still running; then calls `then` (the server's exit), whose graceful shutdown lets
        the cancelled streams send their last chunk."""
        if self.draining:
            return
        self.draining = True

        def cancel_all():
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.inflight:
                time.sleep(0.05)
            with self.lock:
                running = list(self._live)
            for r in running:
                self.engine.cancel(r)
            if then is not None:
                then()

        threading.Thread(target=cancel_all, name="drain", daemon=True).start()

    # -- admission

    def check_open(self) -> None:
        if self.failed:
            raise APIError(503, self.failed)
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if not self.ready:
            raise APIError(503, "the model is loading")

    def admit(self, count: int) -> None:
        with self.lock:
            if self.inflight + count > self.capacity:
                e = APIError(
                    429,
                    f"the queue is full ({self.inflight} requests admitted, room for {self.capacity}); retry later",
                    code="queue_full",
                )
                e.headers["Retry-After"] = "1"
                raise e
            self.inflight += count

    def release(self, count: int = 1) -> None:
        with self.lock:
            self.inflight -= count

    # -- scoring the prompt (completions `echo` with `logprobs`)

    def score(self, ids: list[int]):
        """(log-probability of ids[i] given ids[:i] for i >= 1, top TOP_LOGPROBS (ids, logprobs) per position),
        from the model's distribution (the vocabulary mask only)."""
        import functools

        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from glm4_jax.sampling import mask_vocab

        gen = self.engine.gen
        T = max(16, 1 << (len(ids) - 1).bit_length())
        tokens = np.full((1, T), gen.pad_id, np.int32)
        tokens[0, : len(ids)] = ids
        positions = np.arange(T, dtype=np.int32)[None]  # right padding: later positions are never seen earlier
        fn = self._scorers.get("fn")
        if fn is None:

            def run(graphdef, n_vocab, state, tokens, positions):
                model = nnx.merge(graphdef, state)
                logits, _ = model(tokens, positions, None, logits="all")
                lp = jax.nn.log_softmax(mask_vocab(logits[0].astype(jnp.float32), n_vocab), axis=-1)[:-1]
                chosen = jnp.take_along_axis(lp, tokens[0, 1:, None], axis=-1)[:, 0]
                top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
                return chosen, top_ids, top_lp

            fn = self._scorers["fn"] = jax.jit(functools.partial(run, gen.graphdef, gen.n_vocab))
        with gen._mesh_context():
            chosen, top_ids, top_lp = jax.device_get(fn(gen.state, tokens, positions))
        n = len(ids) - 1
        return [float(x) for x in chosen[:n]], [
            list(zip(top_ids[i].tolist(), top_lp[i].tolist(), strict=True)) for i in range(n)
        ]

    def token_text(self, t: int) -> str:
        return self.tok.token_bytes(t).decode("utf-8", errors="replace")


# ---- the handlers -------------------------------------------------------------------------------------------------


class _Job:
    """One HTTP request's engine requests (its choices), their events on the request's event loop."""

    def __init__(self, svc: Service, choices: list[_Choice]):
        self.svc, self.choices = svc, choices
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.open = 0

    def submit(self, choice: _Choice, ids: list[int], max_new: int, sampling, seed: int, stop_ids) -> None:
        def on_token(r, t):
            lp = (r.token_logprobs[-1], r.top_logprobs[-1]) if r.logprobs is not None else None
            self.loop.call_soon_threadsafe(self.events.put_nowait, (choice, t, lp, None))

        def on_done(r):
            with self.svc.lock:
                self.svc._live.discard(r)
                self.svc.inflight -= 1
                self.svc.stats["cancelled" if r.stop_reason == "cancelled" else "finished"] += 1
            self.loop.call_soon_threadsafe(self.events.put_nowait, (choice, None, None, r.stop_reason))

        from glm4_jax.engine import GenerationError

        try:
            r = self.svc.engine.submit(
                ids,
                max_new_tokens=max_new,
                sampling=sampling,
                seed=seed,
                stop_ids=sorted(stop_ids),
                on_token=on_token,
                on_done=on_done,
                logprobs=self.svc_logprobs(choice),
            )
        except GenerationError as e:
            self.svc.release()
            raise _bad("messages" if choice.chat else "prompt", str(e)) from None
        choice.request = r
        with self.svc.lock:
            self.svc._live.add(r)
        self.open += 1

    @staticmethod
    def svc_logprobs(choice: _Choice):
        return choice.p.logprobs

    async def events_until_done(self, request):
        """Yields (choice, token, logprobs, reason) until every choice ended; cancels all if the client left."""
        while self.open:
            try:
                ev = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                continue
            if ev[3] is not None or ev[1] is None:
                self.open -= 1
            yield ev

    def cancel(self) -> None:
        for c in self.choices:
            if c.request is not None and not c.request.finished:
                self.svc.engine.cancel(c.request)


def _sampling(p: Params):
    from glm4_jax.options import SamplingParams

    return SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, repetition_penalty=p.repetition_penalty
    )


def _budget(svc: Service, n_prompt: int, p: Params, param: str) -> int:
    room = svc.max_len - n_prompt
    if room < 1:
        raise APIError(
            400,
            f"{param}: the prompt is {n_prompt} tokens; this server's context is {svc.max_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if p.max_tokens is None:
        return room
    if p.max_tokens > room:
        raise APIError(
            400,
            f"{p.max_tokens_key}: the prompt ({n_prompt} tokens) plus {p.max_tokens} new tokens exceeds this server's "
            f"context of {svc.max_len} tokens",
            param=p.max_tokens_key,
            code="context_length_exceeded",
        )
    return p.max_tokens


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _envelope(cid: str, model: str):
    """The builder of one request's response bodies and stream chunks: the same id, creation time and model in
    each, `object` the kind, and `usage` where given."""
    created = int(time.time())

    def body(kind: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": cid, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    return body


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def create_app(svc: Service):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="glm4-jax", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # a bug: still OpenAI's shape
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation(request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    def auth(request: Request) -> None:
        key = svc.args.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "incorrect or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def check_model(p: Params) -> None:
        if p.model != svc.model_name:
            raise APIError(
                404,
                f"model: the model {p.model!r} does not exist; this server serves {svc.model_name!r}",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health():
        status = 200 if svc.ready and not svc.draining and not svc.failed else 503
        with svc.lock:
            body = {
                "status": "ok" if status == 200 else ("draining" if svc.draining else svc.failed or "loading"),
                "inflight": svc.inflight,
                **svc.stats,
            }
        engine = getattr(svc, "engine", None)
        body["engine_idle"] = engine.idle if engine is not None else None  # no request queued, running or prefilling
        return JSONResponse(body, status_code=status)

    # The tokenizer endpoints of lm-evaluation-harness's remote tokenizer (`tokenizer_backend=remote`), so that it
    # can score loglikelihood tasks through /v1/completions with token-id prompts and nothing downloaded.
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        auth(request)
        svc.check_open()
        # GLM-4's tokenizer has no BOS token (as its tokenizer_config.json: eos and pad <|endoftext|>, no bos):
        # every prompt starts with the prefix [gMASK]<sop>, which /tokenize adds with add_special_tokens.
        eos = svc.tok.decode([min(svc.eos_ids)])
        pad_id = svc.cfg.pad_token_id
        pad = svc.tok.decode([pad_id]) if 0 <= pad_id < svc.tok.n_vocab else None
        return {"eos_token": eos, "bos_token": None, "pad_token": pad, "model_max_length": svc.max_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        auth(request)
        svc.check_open()
        body = await read_json(request)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise _bad("prompt", "must be a string")
        add_special = _get(body, "add_special_tokens", (bool,), True)
        tokens = svc.tok.encode_prompt(text) if add_special else svc.tok.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": svc.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        auth(request)
        svc.check_open()
        body = await read_json(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _bad("tokens", "must be a list of token ids")
        bad = [t for t in tokens if not 0 <= t < svc.tok.n_vocab]
        if bad:
            raise _bad("tokens", f"token id {bad[0]} is outside the vocabulary [0, {svc.tok.n_vocab})")
        return {"prompt": svc.tok.decode(tokens)}

    def model_card():
        return {"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "glm4-jax",
                "max_model_len": svc.max_len}  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        auth(request)
        if name != svc.model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    # -- completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        body = await read_json(request)
        p = Params(body, chat=False)
        check_model(p)
        svc.check_open()
        prompts = _completion_prompts(body)
        encoded = []
        for text in prompts:
            if isinstance(text, str):
                if not text:
                    raise _bad("prompt", "is empty")
                encoded.append(svc.tok.encode_prompt(text))
            else:
                bad = [t for t in text if not 0 <= t < svc.tok.n_vocab]
                if bad:
                    raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary [0, {svc.tok.n_vocab})")
                encoded.append(text)
        budgets = [_budget(svc, len(ids), p, "prompt") for ids in encoded]
        scores = []
        if p.echo and p.logprobs is not None:
            loop = asyncio.get_running_loop()
            scores = [await loop.run_in_executor(None, svc.score, ids) for ids in encoded]
        choices = [
            _Choice(svc, i * p.n + j, p, chat=False, stop_ids=svc.eos_ids)
            for i in range(len(encoded))
            for j in range(p.n)
        ]
        job = _Job(svc, choices)
        generate = p.max_tokens > 0
        if generate:
            svc.admit(len(choices))
            try:
                for c in choices:
                    i = c.index // p.n
                    job.submit(c, encoded[i], budgets[i], _sampling(p), p.seed + c.index % p.n, svc.eos_ids)
            except APIError:
                job.cancel()
                svc.release(len(choices) - job.open - 1)
                raise
        body_of = _envelope(f"cmpl-{uuid.uuid4().hex}", svc.model_name)
        prompt_tokens = sum(len(ids) for ids in encoded)

        def echo_parts(c: _Choice):
            i = c.index // p.n
            text = svc.tok.decode(encoded[i]) if isinstance(prompts[i], list) else prompts[i]
            return text, i

        def logprobs_block(c: _Choice, entries, offset: int, with_prompt: bool):
            if p.logprobs is None:
                return None
            tokens, token_lps, tops, offsets = [], [], [], []
            if with_prompt:
                i = c.index // p.n
                chosen, top = scores[i]
                ids = encoded[i]
                for k, t in enumerate(ids):
                    s = svc.token_text(t)
                    tokens.append(s)
                    offsets.append(offset)
                    offset += len(s)
                    token_lps.append(None if k == 0 else _lp(chosen[k - 1]))
                    tops.append(None if k == 0 else _top_dict(top[k - 1][: p.logprobs], t, chosen[k - 1]))
            for t, v, top in entries:
                s = svc.token_text(t)
                tokens.append(s)
                offsets.append(offset)
                offset += len(s)
                token_lps.append(_lp(v))
                tops.append(_top_dict(top, t, v))
            return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

        def _top_dict(top, t, v):
            d = {svc.token_text(i): _lp(x) for i, x in top}
            return d

        if not p.stream:
            if generate:
                async for c, t, lp, reason in job.events_until_done(request):
                    c.feed(t, lp) if reason is None else c.done(reason)
            else:
                for c in choices:
                    c.finish = "length"
            out = []
            for c in choices:
                text = c.release()
                block = None
                if p.echo:
                    ptext, _ = echo_parts(c)
                    block = logprobs_block(c, c.logprobs, 0, True)
                    text = ptext + text
                else:
                    block = logprobs_block(c, c.logprobs, 0, False)
                out.append({"index": c.index, "text": text, "logprobs": block, "finish_reason": c.finish})
            return body_of("text_completion", out, _usage(prompt_tokens, choices))

        async def stream():
            def chunk(c, text, block, finish):
                choice = {"index": c.index, "text": text, "logprobs": block, "finish_reason": finish}
                return _sse(body_of("text_completion", [choice]))

            try:
                offsets = {}
                if p.echo:
                    for c in choices:
                        ptext, _ = echo_parts(c)
                        yield chunk(c, ptext, logprobs_block(c, [], 0, True), None)
                        offsets[c.index] = len(ptext)
                async for c, t, lp, reason in job.events_until_done(None):
                    c.feed(t, lp) if reason is None else c.done(reason)
                    text, entries = c.release(), c.release_logprobs()
                    if text or entries or reason is not None:
                        off = offsets.get(c.index, 0)
                        yield chunk(c, text, logprobs_block(c, entries, off, False), c.finish if reason else None)
                        offsets[c.index] = off + len(text)
                if p.include_usage:
                    yield _sse(body_of("text_completion", [], _usage(prompt_tokens, choices)))
                yield b"data: [DONE]\n\n"
            finally:
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    # -- chat

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        body = await read_json(request)
        p = Params(body, chat=True)
        check_model(p)
        svc.check_open()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list of messages")
        tools, tool_choice = body.get("tools"), body.get("tool_choice")
        from glm4_jax import toolcalls as tc

        try:
            glm_messages = tc.to_glm_messages(messages)
            glm_tools = tc.to_glm_tools(tools, tool_choice)
        except tc.ToolRequestError as e:  # "param: message", with .param
            raise APIError(400, str(e), param=e.param or "messages") from None
        try:
            ids = svc.tok.apply_chat_template(glm_messages, add_generation_prompt=True, tools=glm_tools)
        except (ValueError, TypeError) as e:
            raise _bad("tools" if "tool" in str(e) and glm_tools else "messages", str(e)) from None
        budget = _budget(svc, len(ids), p, "messages")
        choices = [_Choice(svc, j, p, chat=True, stop_ids=svc.chat_stop_ids) for j in range(p.n)]
        job = _Job(svc, choices)
        svc.admit(p.n)
        try:
            for c in choices:
                job.submit(c, ids, budget, _sampling(p), p.seed + c.index, svc.chat_stop_ids)
        except APIError:
            job.cancel()
            svc.release(p.n - job.open - 1)
            raise
        body_of = _envelope(f"chatcmpl-{uuid.uuid4().hex}", svc.model_name)

        def content_logprobs(entries):
            def item(t, v):
                s = svc.token_text(t)
                return {"token": s, "logprob": _lp(v), "bytes": list(svc.tok.token_bytes(t))}

            return [{**item(t, v), "top_logprobs": [item(i, x) for i, x in top[: p.logprobs]]} for t, v, top in entries]

        def tool_calls_of(text: str):
            if not glm_tools:
                return None
            calls = tc.parse_tool_calls(text, glm_tools)
            return [(call.name, call.arguments) for call in calls] if calls else None

        def call_objects(calls):
            return [
                {"id": tc.new_call_id(), "type": "function", "function": {"name": n, "arguments": a}} for n, a in calls
            ]

        if glm_tools:  # the raw reply decides (a call is `name\n{json}` right after <|assistant|>)
            for c in choices:
                c.first = False

        if not p.stream:
            async for c, t, lp, reason in job.events_until_done(request):
                c.feed(t, lp) if reason is None else c.done(reason)
            out = []
            for c in choices:
                text = c.release()
                calls = tool_calls_of(text)
                if calls:
                    message = {"role": "assistant", "content": None, "tool_calls": call_objects(calls)}
                    finish = "tool_calls"
                else:
                    message = {"role": "assistant", "content": text.removeprefix("\n") if glm_tools else text}
                    finish = c.finish
                lp_block = None if p.logprobs is None else {"content": content_logprobs(c.logprobs)}
                out.append({"index": c.index, "message": message, "logprobs": lp_block, "finish_reason": finish})
            return body_of("chat.completion", out, _usage(len(ids), choices))

        async def stream():
            def chunk(c, delta, entries=None, finish=None):
                lp_block = None if p.logprobs is None or entries is None else {"content": content_logprobs(entries)}
                choice = {"index": c.index, "delta": delta, "logprobs": lp_block, "finish_reason": finish}
                return _sse(body_of("chat.completion.chunk", [choice]))

            try:
                for c in choices:
                    yield chunk(c, {"role": "assistant", "content": ""})
                parsers = {c.index: tc.ToolCallStream(glm_tools) for c in choices} if glm_tools else {}
                saw_call = {c.index: False for c in choices}
                saw_content = {c.index: False for c in choices}
                async for c, t, lp, reason in job.events_until_done(None):
                    c.feed(t, lp) if reason is None else c.done(reason)
                    entries = c.release_logprobs()
                    if glm_tools and c.index not in parsers:  # no streaming parser: decide at the end
                        if reason is None:
                            continue
                        text = c.release()
                        calls = tool_calls_of(text)
                        if calls:
                            for k, call in enumerate(call_objects(calls)):
                                yield chunk(c, {"tool_calls": [{"index": k, **call}]})
                            yield chunk(c, {}, c.logprobs, "tool_calls")
                        else:
                            yield chunk(c, {"content": text.removeprefix("\n")}, c.logprobs, None)
                            yield chunk(c, {}, None, c.finish)
                        continue
                    text = c.release()
                    if c.index in parsers:
                        events = parsers[c.index].feed(text) if text else []
                        if reason is not None:
                            events += parsers[c.index].close()
                        for ev in events:
                            if isinstance(ev, tc.ToolCallDelta):
                                saw_call[c.index] = True
                                d = {"index": ev.index}
                                if ev.id is not None:
                                    d["id"], d["type"] = ev.id, "function"
                                fn = {}
                                if ev.name is not None:
                                    fn["name"] = ev.name
                                if ev.arguments is not None:
                                    fn["arguments"] = ev.arguments
                                d["function"] = fn
                                yield chunk(c, {"tool_calls": [d]})
                            elif ev.text:
                                text = ev.text
                                if not saw_content[c.index]:  # the newline after <|assistant|>
                                    text, saw_content[c.index] = text.removeprefix("\n"), True
                                if text:
                                    yield chunk(c, {"content": text})
                        if entries:
                            yield chunk(c, {}, entries)
                        if reason is not None:
                            yield chunk(c, {}, None, "tool_calls" if saw_call[c.index] else c.finish)
                        continue
                    if text or entries:
                        yield chunk(c, {"content": text}, entries)
                    if reason is not None:
                        yield chunk(c, {}, None, c.finish)
                if p.include_usage:
                    yield _sse(body_of("chat.completion.chunk", [], _usage(len(ids), choices)))
                yield b"data: [DONE]\n\n"
            finally:
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


# ---- the command line ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The server (see `--help`). Returns 0 after a SIGTERM or Ctrl-C; bad input: one line `error: ...`, exit 2."""
    try:
        args = build_parser().parse_args(argv)
        _validate(args)
        svc = Service(args)
        t0 = time.perf_counter()
        svc.load()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    import uvicorn

    app = create_app(svc)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # The first signal drains: uvicorn keeps listening (new requests get 503, /health "draining") until the
            # running requests end or are cancelled; a second signal exits at once.
            if svc.draining:
                self.exit_now(sig, frame)
            else:
                svc.drain(args.shutdown_timeout, then=lambda: self.exit_now(sig, frame))

        def exit_now(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a handled SIGTERM ends the process with 0, not by the signal

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, int(args.shutdown_timeout + 2)),
    )
    server = Server(config)

    def warm():
        try:
            svc.start()
            print(f"ready: {svc.model_name} ({time.perf_counter() - t0:.1f} s to load and compile)", file=sys.stderr)
        except Exception as e:
            svc.failed = f"warm-up failed: {type(e).__name__}: {e}"
            print(f"error: {svc.failed}", file=sys.stderr)

    threading.Thread(target=warm, name="warmup", daemon=True).start()  # /health answers 503 meanwhile
    try:
        server.run()
    finally:
        svc.shutdown()
    if server.started is False and not svc.draining:
        print(f"error: cannot serve on {args.host}:{args.port}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("glm4_jax.serve", sys.modules[__name__])
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
