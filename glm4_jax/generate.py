"""Generation: a jitted prefill plus a jitted `lax.while_loop` decode, and the `python -m glm4_jax.generate` CLI.

How a batch is generated (`Generator`):

1. Prompts are left-padded to one length; positions start at 0 on each row's first real token and are negative on
   padding (the model masks keys by position, see glm4_jax/model.py).
2. Prefill, chunk by chunk: the padded prompt goes into the KV cache `prefill_chunk` tokens at a time, asking the
   model for the last position's logits only, so activation memory does not grow with the prompt. A prompt of
   `n * chunk + r` tokens is fed as one leading chunk holding the `r` tokens and the padding, then `n` full chunks.
   The leading chunk's length is bucketed (the next power of two >= 16, at most `chunk`), so prompts of new
   lengths reuse compiled code: the prefill compiles for the bucket sizes and `chunk` only (near the end of the
   cache the leading chunk shrinks so that padding never takes the slots of the new tokens).
3. Decode: one jitted `lax.while_loop` whose carry (`DecodeState`) holds the cache, the last token, the positions,
   a per-row `done` mask and the output buffer. The loop stops when every row has hit a stop id, after
   `max_new_tokens`, or when the cache is full. The state is donated, so the cache is updated in place.
   The model is split with `nnx.split` and its state passed as an argument (not baked into the HLO as constants).
4. Streaming (`Generator.stream`, and what the CLI uses to print text as it comes): a Python loop calling the
   same jitted step function the while-loop runs, one token at a time; it gives the same tokens as the compiled
   loop (the random key of step n is `fold_in(key(seed), n)` on both paths), which tests/test_generate.py checks.
5. Compilation is ahead of time (`jit(...).lower(...).compile()`), cached per model structure, argument shapes and
   shardings and static settings, and shared by every Generator; timings (`GenerationResult`) leave it out and
   report it apart (`compile_s`).

Why the CLI streams with the Python loop rather than `jax.debug.callback`/`io_callback` inside the compiled
loop: streaming needs a device-to-host transfer per token either way; a callback would tie host I/O (and the
UTF-8 holding-back of the stream decoder) into the compiled program, runs once per device (or needs ordering
effects) on a mesh, and cannot be stopped from the host. The Python loop costs one dispatch per token, which the
per-token transfer dominates anyway; `--no-stream` runs the compiled loop and prints the text at the end.

The CLI, the error messages and the defaults are documented in `--help` (see `build_parser`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm4_jax.config import Config
from glm4_jax.model import GLM4, KVCache
from glm4_jax.sampling import CHAT_DEFAULTS, SamplingParams, sample

Array = jax.Array

GLM4_N_VOCAB = 151343  # ids of the GLM-4 tokenizer (151329 ranks + 14 specials); rows above are padding
GLM4_VOCAB_ROWS = 151552
DEFAULT_PREFILL_CHUNK = 512
MIN_BUCKET = 16  # the smallest leading prefill chunk
CACHE_ROUND = 128  # default cache lengths are rounded up to a multiple of this (fewer recompiles)
DEFAULT_MAX_NEW_TOKENS = 256


class GenerationError(ValueError):
    """A request that cannot be generated (empty prompt, prompt too long for the cache, bad settings)."""


class PromptTooLongError(GenerationError):
    def __init__(self, length: int, limit: int, what: str):
        self.length, self.limit = length, limit
        super().__init__(f"the prompt is {length} tokens, longer than {what} ({limit} tokens)")


# ---- planning: padding, chunks, cache length ---------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_prefill(length: int, chunk: int, *, limit: int | None = None, bucket: bool = True) -> list[int]:
    """The chunk lengths in which a (left-padded) prompt of `length` tokens is fed; their sum is the padded length.

    A prompt of `n * chunk + r` tokens is one leading chunk of `r` tokens plus padding (its length bucketed to the
    next power of two >= MIN_BUCKET, at most `chunk`; exactly `r` without bucketing), then `n` chunks of `chunk`.
    `limit` caps the padded length (the cache length); it must be >= length.
    """
    if length < 1 or chunk < 1:
        raise ValueError(f"length ({length}) and chunk ({chunk}) must be >= 1")
    if limit is not None and length > limit:
        raise ValueError(f"length {length} exceeds the limit {limit}")
    n_full, rem = divmod(length, chunk)
    sizes = [chunk] * n_full
    if rem:
        first = min(_next_pow2(max(rem, MIN_BUCKET)), chunk) if bucket else rem
        if limit is not None:
            first = min(first, limit - n_full * chunk)
        sizes.insert(0, first)
    return sizes


def pad_left(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to `length`. Returns (tokens [B, length] int32, positions [B, length] int32): positions
    count from 0 at each row's first real token and are negative on padding."""
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    positions = np.zeros((B, length), np.int32)
    for b, p in enumerate(prompts):
        n = len(p)
        tokens[b, length - n :] = p
        positions[b] = np.arange(length) - (length - n)
    return tokens, positions


def default_n_vocab(cfg: Config) -> int:
    """Without a tokenizer: the GLM-4 tokenizer's 151343 ids for GLM-4's 151552-row embedding, else every row."""
    return GLM4_N_VOCAB if cfg.vocab_size == GLM4_VOCAB_ROWS else cfg.vocab_size


def truncate_left(ids: Sequence[int], keep: int, prefix: Sequence[int] = ()) -> list[int]:
    """The last `keep` ids of a prompt (at least one). A leading `prefix` (`[gMASK]<sop>`) is kept in front and
    counts towards `keep`."""
    ids = list(ids)
    if len(ids) <= keep:
        return ids
    prefix = list(prefix)
    if prefix and ids[: len(prefix)] == prefix and keep > len(prefix):
        return prefix + ids[len(ids) - (keep - len(prefix)) :]
    return ids[len(ids) - max(1, keep) :]


# ---- the compiled pieces -------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The carry of the decode loop."""

    cache: KVCache
    tok: Array  # [B] int32: the last token chosen (the pad id on rows already done)
    pos: Array  # [B] int32: the position `tok` takes when it is fed back
    n: Array  # [] int32: tokens chosen so far
    done: Array  # [B] bool: the row has chosen a stop id
    out: Array  # [B, max_new_tokens] int32: the chosen tokens (pad id after a row is done)
    seen: Array  # [B, V] bool: ids in the prompt or chosen (repetition penalty); [B, 0] without a penalty
    key: Array  # the PRNG key; step n draws with fold_in(key, n)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static (hashable) settings of one compiled decode."""

    sampling: SamplingParams
    n_vocab: int
    stop_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int


def _prefill_chunk(graphdef, state, cache: KVCache, tokens: Array, positions: Array):
    """Appends one chunk [B, C] to the cache; returns (last-position logits [B, V] float32, cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, positions, cache, logits="last")
    return logits[:, 0], cache


def _choose(s: _Settings, d: DecodeState, logits: Array) -> DecodeState:
    """Samples the next token of every row from logits [B, V] and records it."""
    B = d.tok.shape[0]
    seen = d.seen if s.sampling.uses_penalty else None
    tok = sample(logits, jax.random.fold_in(d.key, d.n), s.sampling, n_vocab=s.n_vocab, seen=seen)
    tok = jnp.where(d.done, s.pad_id, tok)
    out = jax.lax.dynamic_update_slice(d.out, tok[:, None], (jnp.zeros((), jnp.int32), d.n))
    new_seen = d.seen.at[jnp.arange(B), tok].set(True) if s.sampling.uses_penalty else d.seen
    done = d.done | jnp.isin(tok, jnp.asarray(s.stop_ids, jnp.int32)) if s.stop_ids else d.done
    return dataclasses.replace(d, tok=tok, out=out, seen=new_seen, done=done, n=d.n + 1)


def _start(s: _Settings, cache: KVCache, logits: Array, lengths: Array, seen: Array, key: Array) -> DecodeState:
    """The decode state after the prefill, with the first token chosen from the prefill's logits."""
    B = lengths.shape[0]
    d = DecodeState(
        cache=cache,
        tok=jnp.zeros((B,), jnp.int32),
        pos=lengths.astype(jnp.int32),
        n=jnp.zeros((), jnp.int32),
        done=jnp.zeros((B,), bool),
        out=jnp.full((B, s.max_new_tokens), s.pad_id, jnp.int32),
        seen=seen,
        key=key,
    )
    return _choose(s, d, logits)


def _step(graphdef, s: _Settings, state, d: DecodeState) -> DecodeState:
    """Feeds the last tokens [B] and chooses the next ones: the body of the decode loop."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(d.tok[:, None], d.pos[:, None], d.cache, logits="last")
    d = dataclasses.replace(d, cache=cache, pos=d.pos + 1)
    return _choose(s, d, logits[:, 0])


def _running(s: _Settings, d: DecodeState) -> Array:
    return (d.n < s.max_new_tokens) & ~jnp.all(d.done) & (d.cache.end < d.cache.pos.shape[1])


def _loop(graphdef, s: _Settings, state, d: DecodeState) -> DecodeState:
    """The whole decode as one `lax.while_loop`."""
    return jax.lax.while_loop(functools.partial(_running, s), functools.partial(_step, graphdef, s, state), d)


# ---- results -------------------------------------------------------------------------------------------------------


STOP_REASONS = ("stop_id", "max_new_tokens", "cache_full")


@dataclasses.dataclass
class GenerationResult:
    """What `Generator.generate` returns. Timings exclude compilation (`compile_s`, measured on its own)."""

    ids: list[list[int]]  # per prompt: the generated ids, prompt excluded, a stop id included when one was hit
    stop_reasons: list[str]  # per prompt: "stop_id", "max_new_tokens" or "cache_full"
    prompt_tokens: list[int]  # per prompt: its length in tokens
    padded_length: int  # the prompt length after left padding and bucketing
    max_len: int  # slots in the KV cache
    steps: int  # tokens chosen per row (including after a row was done)
    prefill_s: float  # prefill and the choice of the first token
    decode_s: float  # the remaining steps-1 tokens
    compile_s: float  # compilation during this call (0 once every shape has been seen)
    streamed: bool  # the Python loop (True) or the compiled while-loop (False)
    texts: list[str] | None = None  # filled in by glm4_jax.api.GLM4Chat

    @property
    def decode_tok_s(self) -> float:
        """Decode throughput after the first token: rows x (steps - 1) / decode_s."""
        return len(self.ids) * (self.steps - 1) / self.decode_s if self.decode_s > 0 and self.steps > 1 else 0.0


# ---- the generator ---------------------------------------------------------------------------------------------

_COMPILED: dict = {}  # (function, static settings, graphdef, parameter avals, argument avals) -> compiled executable


def clear_compiled() -> None:
    """Drops every compiled generation function (they are cached across Generators)."""
    _COMPILED.clear()


class Generator:
    """Generates from token ids with a GLM4 model (the low-level API; `glm4_jax.api.GLM4Chat` adds the tokenizer).

    Compiled functions are cached per shape and setting (ahead-of-time, so their compile time is measured apart):
    a new prompt length in an already seen bucket, or a new seed, does not compile anything.
    """

    def __init__(
        self,
        model: GLM4,
        *,
        n_vocab: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        mesh: jax.sharding.Mesh | None = None,
        bucket: bool = True,
    ):
        """
        Args:
          model: the model (its parameters may be sharded over `mesh`).
          n_vocab: ids >= n_vocab are never sampled (the tokenizer's `n_vocab`; default `default_n_vocab(cfg)`).
          prefill_chunk: prompt tokens per prefill call.
          mesh: the device mesh the model is sharded over; the cache is then created sharded too.
          bucket: pad the prompt length to a bucket (False: feed its exact length; for tests).
        """
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cfg: Config = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.embed[...].dtype
        self.n_vocab = int(n_vocab) if n_vocab is not None else default_n_vocab(self.cfg)
        self.prefill_chunk = int(prefill_chunk)
        self.mesh = mesh
        self.bucket = bucket
        pad = self.cfg.pad_token_id
        # Padding must be a real embedding row (an out-of-range id would embed as NaN and poison the attention).
        self.pad_id = pad if 0 <= pad < self.cfg.vocab_size else 0
        self._state_sig = tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves(self.state))
        self._keys: set = set()  # what this Generator compiled
        self._compile_s = 0.0

    # -- compilation cache

    def _call(self, name: str, static, fn: Callable, donate: tuple[int, ...], *args):
        """Runs jit(fn)(*args) (see `_compiled`)."""
        compiled = self._compiled(name, static, fn, donate, *args)
        with self._mesh_context():
            return compiled(*args)

    def _compiled(self, name: str, static, fn: Callable, donate: tuple[int, ...], *args):
        """jit(fn) compiled ahead of time for these arguments, once per model structure, argument shapes and
        shardings, and `static`. The cache is shared by all Generators (`clear_compiled`), so a new Generator (a
        new GLM4Chat in a notebook, a second CLI call in-process) of the same model reuses the executables."""
        sig = tuple(
            (x.shape, str(x.dtype), getattr(x, "sharding", None))
            for a in args
            if a is not self.state
            for x in jax.tree.leaves(a)
        )
        key = (name, static, self.graphdef, self._state_sig, sig)
        compiled = _COMPILED.get(key)
        if compiled is None:
            t = time.perf_counter()
            with self._mesh_context():
                compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self._compile_s += time.perf_counter() - t
            _COMPILED[key] = compiled
            self._keys.add(key)
        return compiled

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def compiled_count(self, name: str | None = None) -> int:
        """How many functions this Generator compiled ("prefill", "start", "loop", "step"), for tests of the
        bucketing."""
        return sum(1 for k in self._keys if name is None or k[0] == name)

    # -- planning

    def plan(self, lengths: Sequence[int], max_new_tokens: int, max_len: int | None = None) -> tuple[list[int], int]:
        """(prefill chunk lengths, cache length) for prompts of `lengths` tokens. Raises GenerationError."""
        cap = self.cfg.max_seq_len
        longest = max(lengths)
        if max_len is not None:
            if max_len < 1:
                raise GenerationError(f"max_len must be >= 1, got {max_len}")
            if max_len > cap:
                raise GenerationError(f"max_len {max_len} exceeds the model's context of {cap} tokens")
            if longest > max_len:
                raise PromptTooLongError(longest, max_len, "the cache (max_len)")
            limit = max_len
        else:
            if longest > cap:
                raise PromptTooLongError(longest, cap, "the model's context")
            limit = cap
        # Bucket padding may not take the slots of the new tokens: near the limit the bucket shrinks.
        room = max(longest, limit - max_new_tokens + 1)
        sizes = plan_prefill(longest, self.prefill_chunk, limit=room, bucket=self.bucket)
        padded = sum(sizes)
        if max_len is None:
            max_len = min(-(-(padded + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND, cap)
        return sizes, max(max_len, padded)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.mesh is None:
            return KVCache.init(self.cfg, batch, max_len, self.dtype)
        from glm4_jax.sharding import init_cache

        return init_cache(self.cfg, self.mesh, batch, max_len, self.dtype)

    def _settings(self, sampling, max_new_tokens, stop_ids) -> _Settings:
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = self.cfg.eos_token_ids if stop_ids is None else stop_ids
        return _Settings(
            sampling=sampling,
            n_vocab=self.n_vocab,
            stop_ids=tuple(sorted({int(i) for i in stops})),
            pad_id=self.pad_id,
            max_new_tokens=int(max_new_tokens),
        )

    def _check_prompts(self, prompts) -> list[list[int]]:
        if len(prompts) == 0:
            raise GenerationError("no prompts")
        if isinstance(prompts[0], (int, np.integer)):
            raise GenerationError("prompts is a list of token-id lists (wrap a single prompt: [ids])")
        out = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise GenerationError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has token id {bad[0]}, outside [0, {self.cfg.vocab_size})")
            out.append(p)
        return out

    # -- generation

    def _prefill(self, prompts, s: _Settings, max_len, seed) -> tuple[DecodeState, list[int], int, int]:
        """Pads, runs the chunked prefill and chooses the first token. Returns (state, lengths, padded, max_len)."""
        prompts = self._check_prompts(prompts)
        lengths = [len(p) for p in prompts]
        sizes, max_len = self.plan(lengths, s.max_new_tokens, max_len)
        padded = sum(sizes)
        tokens, positions = pad_left(prompts, padded, self.pad_id)
        B = len(prompts)
        cache = self.new_cache(B, max_len)
        start = 0
        logits = None
        for size in sizes:
            chunk = (tokens[:, start : start + size], positions[:, start : start + size])
            logits, cache = self._call(
                "prefill", size, functools.partial(_prefill_chunk, self.graphdef), (1,), self.state, cache, *chunk
            )
            start += size
        V = self.cfg.vocab_size if s.sampling.uses_penalty else 0
        seen = np.zeros((B, V), bool)
        if V:
            for b, p in enumerate(prompts):
                seen[b, p] = True
        key = jax.random.key(seed)
        lengths_arr = np.asarray(lengths, np.int32)
        d = self._call("start", s, functools.partial(_start, s), (0,), cache, logits, lengths_arr, seen, key)
        return d, lengths, padded, max_len

    def _result(self, s: _Settings, out: np.ndarray, steps: int, lengths, padded, max_len, times, streamed):
        ids, reasons = [], []
        stops = set(s.stop_ids)
        for row in out[:, :steps].tolist():
            hit = next((i for i, t in enumerate(row) if t in stops), None)
            if hit is not None:
                ids.append(row[: hit + 1])
                reasons.append("stop_id")
            else:
                ids.append(row)
                reasons.append("max_new_tokens" if steps >= s.max_new_tokens else "cache_full")
        prefill_s, decode_s, compile_s = times
        return GenerationResult(
            ids=ids,
            stop_reasons=reasons,
            prompt_tokens=list(lengths),
            padded_length=padded,
            max_len=max_len,
            steps=steps,
            prefill_s=prefill_s,
            decode_s=decode_s,
            compile_s=compile_s,
            streamed=streamed,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        max_len: int | None = None,
    ) -> GenerationResult:
        """Generates for a batch of prompts with the compiled while-loop.

        Args:
          prompts: token-id lists (of any lengths; they are left-padded together).
          max_new_tokens: tokens to generate at most per prompt.
          sampling: the sampling settings (default greedy).
          seed: the PRNG seed (the same seed gives the same tokens).
          stop_ids: ids that end a sequence (default `cfg.eos_token_ids`; `()` for none).
          max_len: KV cache slots (default: the padded prompt plus max_new_tokens, rounded up to a multiple of
            128, at most cfg.max_seq_len). Generation stops early when the cache is full.
        """
        s = self._settings(sampling or SamplingParams(), max_new_tokens, stop_ids)
        c0, t0 = self._compile_s, time.perf_counter()
        d, lengths, padded, max_len = self._prefill(prompts, s, max_len, seed)
        jax.block_until_ready(d.tok)
        c1, t1 = self._compile_s, time.perf_counter()
        d = self._call("loop", s, functools.partial(_loop, self.graphdef, s), (1,), self.state, d)
        out, steps = jax.device_get((d.out, d.n))
        c2, t2 = self._compile_s, time.perf_counter()
        times = ((t1 - t0) - (c1 - c0), (t2 - t1) - (c2 - c1), c2 - c0)
        return self._result(s, np.asarray(out), int(steps), lengths, padded, max_len, times, streamed=False)

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        max_len: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Like `generate`, with a Python loop that yields each step's tokens as they come.

        Yields:
          np.ndarray [B] int32 per step: the token chosen for each row (the pad id on rows already done).
        Returns:
          the GenerationResult, as the generator's return value (`result = yield from gen.stream(...)`, or
          `StopIteration.value`); `generate_streaming` gives it directly.
        """
        s = self._settings(sampling or SamplingParams(), max_new_tokens, stop_ids)
        c0, t0 = self._compile_s, time.perf_counter()
        d, lengths, padded, max_len = self._prefill(prompts, s, max_len, seed)
        tok, done = jax.device_get((d.tok, d.done))
        c1, t1 = self._compile_s, time.perf_counter()
        outs = [tok]
        paused = 0.0  # time spent by the consumer between yields, not counted as decode time
        t = time.perf_counter()
        yield tok
        paused += time.perf_counter() - t
        steps, end = 1, padded
        step = None  # the compiled step: looked up once, its argument shapes never change
        while steps < s.max_new_tokens and not done.all() and end < max_len:
            if step is None:
                step = self._compiled("step", s, functools.partial(_step, self.graphdef, s), (1,), self.state, d)
            with self._mesh_context():
                d = step(self.state, d)
            tok, done = jax.device_get((d.tok, d.done))
            steps, end = steps + 1, end + 1
            outs.append(tok)
            t = time.perf_counter()
            yield tok
            paused += time.perf_counter() - t
        c2, t2 = self._compile_s, time.perf_counter()
        times = ((t1 - t0) - (c1 - c0), (t2 - t1) - (c2 - c1) - paused, c2 - c0)
        out = np.stack(outs, axis=1)
        return self._result(s, out, steps, lengths, padded, max_len, times, streamed=True)

    def generate_streaming(
        self, prompts: Sequence[Sequence[int]], on_step: Callable[[np.ndarray], None] | None = None, **kwargs
    ) -> GenerationResult:
        """`stream`, consumed: calls `on_step(tokens [B])` per step and returns the GenerationResult."""
        it = self.stream(prompts, **kwargs)
        while True:
            try:
                tok = next(it)
            except StopIteration as stop:
                return stop.value
            if on_step is not None:
                on_step(tok)


# ---- CLI -----------------------------------------------------------------------------------------------------------


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
        choices=("bfloat16", "float32", "float16"),
        help="compute dtype (default: the checkpoint's own, so a float32 checkpoint runs in float32)",
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
    if args.temperature is not None and not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 turns it off), got {args.top_k}")
    if not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be > 0 (1 turns it off), got {args.repetition_penalty}")
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
    base = CHAT_DEFAULTS if chat else SamplingParams()
    return SamplingParams(
        temperature=base.temperature if args.temperature is None else args.temperature,
        top_p=base.top_p if args.top_p is None else args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


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
    path = os.path.join(ckpt, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    from glm4_jax.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.from_file(path)
    except (OSError, TokenizerError) as e:
        raise UsageError(f"--ckpt {ckpt}: cannot read tokenizer.model: {e}") from None


def _load_model(args, mesh):
    from glm4_jax import checkpoint

    try:
        return checkpoint.load(args.ckpt, mesh=mesh, dtype=args.dtype)
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


def _run_one(
    chat, ids: list[int], args, sampling, stop_ids, out: _Out, *, answer: bool = False
) -> tuple[GenerationResult, str]:
    """Generates for one prompt, streaming text (or ids, without a tokenizer) to stdout; returns (result, text).

    With `answer` (chat), the newline the model writes right after `<|assistant|>` is left out of the text."""
    kw = dict(
        max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stop_ids=stop_ids, max_len=args.max_len
    )
    tok = chat.tokenizer
    stops = set(chat.generator._settings(sampling, args.max_new_tokens, stop_ids).stop_ids)
    first = [answer]  # still to strip a leading newline

    def emit(piece: str) -> None:
        if first[0] and piece:
            first[0] = False
            piece = piece.removeprefix("\n")
        out.write(piece)

    if args.no_stream:
        res = chat.generator.generate([ids], **kw)
        emit(tok.decode([t for t in res.ids[0] if t not in stops]) if tok else " ".join(map(str, res.ids[0])))
    else:
        decoder = tok.stream_decoder() if tok else None

        def on_step(step_tokens):
            t = int(step_tokens[0])
            if decoder is None:
                out.write(f"{t} ")
            elif t not in stops:
                emit(decoder.feed(t))

        res = chat.generator.generate_streaming([ids], on_step, **kw)
        if decoder is not None:
            emit(decoder.flush())
    out.write("\n")
    text = tok.decode([t for t in res.ids[0] if t not in stops]) if tok else ""
    return res, text.removeprefix("\n") if answer else text


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
            f"{flag} needs a tokenizer, but {args.ckpt} has no tokenizer.model (use --prompt-ids, or convert from a "
            "directory that has tokenizer.model)"
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

    chat = GLM4Chat(model, tok, mesh=mesh, prefill_chunk=args.prefill_chunk)
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
