"""The generation engine: a jitted, chunked prefill plus a jitted `lax.while_loop` decode over token ids.

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
4. Streaming (`Generator.stream`, which `glm4_jax.api.GLM4Chat` and the `generate` CLI use to print text as it
   comes): a Python loop calling the same jitted step function the while-loop runs, one token at a time; it gives
   the same tokens as the compiled loop (row b draws its step n with `fold_in(fold_in(key(seed), b), n)` on both
   paths), which tests/test_generate.py checks.
6. The choice of each token (`pick`: `glm4_jax.sampling.sample_rows`, the stop test, the repetition record) is
   the one the continuous-batching engine (glm4_jax.batching) runs too, with one setting broadcast to every row.
5. Compilation is ahead of time (`jit(...).lower(...).compile()`), cached per model structure, argument shapes and
   shardings and static settings, and shared by every Generator; timings (`GenerationResult`) leave it out and
   report it apart (`compile_s`).

On one CPU device the Generator runs from its own layout of the parameters (`cpu_params`: the layers held apart,
bf16 matrices in float32, converted once), so that the per-token step costs what a step of the while-loop costs and
neither holds a copy of the weights in its temp memory (docs/DESIGN.md, BENCHMARKS.md).

Why streaming uses the Python loop rather than `jax.debug.callback`/`io_callback` inside the compiled loop:
streaming needs a device-to-host transfer per token either way; a callback would tie host I/O (and the UTF-8
holding-back of the stream decoder) into the compiled program, runs once per device (or needs ordering effects)
on a mesh, and cannot be stopped from the host. The Python loop costs one dispatch per token, which the per-token
transfer dominates anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm4_jax.config import MODEL_QUANTIZED, Config
from glm4_jax.model import GLM4, KVCache
from glm4_jax.options import (  # noqa: F401  (re-exported: jax-free, so that the CLI reads them before JAX starts)
    CACHE_ROUND,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    SamplingParams,
    truncate_left,
)
from glm4_jax.sampling import RowSampling, row_keys, sample_rows

Array = jax.Array

GLM4_N_VOCAB = 151343  # ids of the GLM-4 tokenizer (151329 ranks + 14 specials); rows above are padding
GLM4_VOCAB_ROWS = 151552
MIN_BUCKET = 16  # the smallest leading prefill chunk


class GenerationError(ValueError):
    """A request that cannot be generated (empty prompt, prompt too long for the cache, bad settings)."""


class PromptTooLongError(GenerationError):
    def __init__(self, length: int, limit: int, what: str):
        self.length, self.limit = length, limit
        super().__init__(f"the prompt is {length} tokens, longer than {what} ({limit} tokens)")


# ---- padding, chunks, cache length ---------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def prefill_chunks(length: int, chunk: int, *, limit: int | None = None, bucket: bool = True) -> list[int]:
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
    key: Array  # [B] PRNG keys, fold_in(key(seed), b) for row b; its step n draws with fold_in(key[b], n)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
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


def pick(
    logits: Array,
    keys: Array,
    n: Array,
    rows: RowSampling,
    n_vocab: int,
    seen: Array | None,
    stops: Array,
) -> tuple[Array, Array, Array | None]:
    """The choice of the next token of every row, the stop test and the repetition record: the one copy that the
    static-batch decode (`Generator`) and the continuous-batching engine (glm4_jax.batching) both run.

    Args:
      logits: [B, V] float32, the last position's logits.
      keys: [B] PRNG keys, one per row (per request); the n-th token of a row draws with fold_in(key, n).
      n: [B] int32, tokens the row has chosen so far.
      rows: the sampling settings of each row ([B] arrays).
      n_vocab: ids >= n_vocab are never chosen.
      seen: [B, V] bool (ids in the prompt or chosen), or None without a repetition penalty.
      stops: [B, M] int32 stop ids of each row, padded with -1 (M may be 0).
    Returns:
      (tokens [B] int32, hit a stop id [B] bool, seen with the new tokens or None).
    """
    B = logits.shape[0]
    step_keys = jax.vmap(jax.random.fold_in)(keys, n)
    tok = sample_rows(logits, step_keys, rows, n_vocab=n_vocab, seen=seen)
    hit = jnp.any(tok[:, None] == stops, axis=-1)
    if seen is not None:
        seen = seen.at[jnp.arange(B), tok].set(True)
    return tok, hit, seen


def _choose(s: DecodeSettings, d: DecodeState, logits: Array) -> DecodeState:
    """Chooses the next token of every row from logits [B, V] (`pick`, one setting for the batch) and records it."""
    B = d.tok.shape[0]
    rows = RowSampling.of([s.sampling] * B)
    stops = np.broadcast_to(np.asarray(s.stop_ids, np.int32), (B, len(s.stop_ids)))
    seen = d.seen if s.sampling.uses_penalty else None
    tok, hit, new_seen = pick(logits, d.key, jnp.full((B,), d.n), rows, s.n_vocab, seen, stops)
    tok = jnp.where(d.done, s.pad_id, tok)
    out = jax.lax.dynamic_update_slice(d.out, tok[:, None], (jnp.zeros((), jnp.int32), d.n))
    new_seen = d.seen if new_seen is None else new_seen
    return dataclasses.replace(d, tok=tok, out=out, seen=new_seen, done=d.done | hit, n=d.n + 1)


def _start(s: DecodeSettings, cache: KVCache, logits: Array, lengths: Array, seen: Array, key: Array) -> DecodeState:
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
        key=row_keys(key, B),
    )
    return _choose(s, d, logits)


def _step(graphdef, s: DecodeSettings, state, d: DecodeState) -> DecodeState:
    """Feeds the last tokens [B] and chooses the next ones: the body of the decode loop."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(d.tok[:, None], d.pos[:, None], d.cache, logits="last")
    d = dataclasses.replace(d, cache=cache, pos=d.pos + 1)
    return _choose(s, d, logits[:, 0])


def _running(s: DecodeSettings, d: DecodeState) -> Array:
    return (d.n < s.max_new_tokens) & ~jnp.all(d.done) & (d.cache.end < d.cache.pos.shape[1])


def _loop(graphdef, s: DecodeSettings, state, d: DecodeState) -> DecodeState:
    """The whole decode as one `lax.while_loop`."""
    return jax.lax.while_loop(functools.partial(_running, s), functools.partial(_step, graphdef, s, state), d)


# ---- results -------------------------------------------------------------------------------------------------------


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


def cpu_params(model: GLM4) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model` laid out for a CPU device, made once: the layers held apart (each stacked
    [L, ...] parameter as a tuple of its L arrays, which the model then runs unrolled: `glm4_jax.model.over_layers`),
    the bf16 (or float16) matrices (MODEL_QUANTIZED's paths, the output layer included) converted to float32, `o` as
    [N * H, D], and a bf16 embedding as its 16-bit patterns (`glm4_jax.model.embed_rows`). Norms, biases and
    quantized matrices keep their dtype, and so do the activations: a matmul reads bf16 inputs and a float32 matrix
    and rounds its product to bf16.

    Why: XLA's CPU matmuls compute bf16 in float32, converting the matrix at every call; they copy a layer's slice
    out of a stacked array before reading it, and `o` transposed to the attention output's order; its gather
    converts a bf16 table to float32. The compiled while-loop hoisted those conversions (a float32 copy of every
    weight in its temp memory) and a per-token step redid all of it at every token, into a fresh buffer. Here none
    happens. The state does not refer to the model's converted or stacked arrays: a caller that drops the model
    keeps the float32 matrices only (twice their bf16 bytes)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)  # new Variables sharing the arrays: the model is not changed
    for path, _ in nnx.to_flat_state(nnx.state(copy, nnx.Param)):
        *parents, name = (str(k) for k in path)
        var = getattr(functools.reduce(getattr, parents, copy), name)
        value = var.get_value()
        key = "/".join((*parents, name))
        half = value.dtype.itemsize == 2 and jnp.issubdtype(value.dtype, jnp.floating)
        if key in MODEL_QUANTIZED and half:
            value = value.astype(jnp.float32)
        elif key == "embed" and half and value.dtype == jnp.dtype(model.cfg.dtype):  # gathered as integers
            value = jax.lax.bitcast_convert_type(value, jnp.uint16)
        if parents[:1] == ["layers"]:
            value = tuple(value[i] for i in range(value.shape[0]))
            n_in = len(MODEL_QUANTIZED.get(key, ()))
            if n_in > 1 and jnp.issubdtype(value[0].dtype, jnp.floating):  # o [N, H, D] as [N * H, D]
                value = tuple(v.reshape(-1, *v.shape[n_in:]) for v in value)
        var.set_value(value)
    return nnx.split(copy)


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
        kv_cache: str | None = None,
        cpu_layout: bool | None = None,
    ):
        """
        Args:
          model: the model (its parameters may be sharded over `mesh`).
          n_vocab: ids >= n_vocab are never sampled (the tokenizer's `n_vocab`; default `default_n_vocab(cfg)`).
          prefill_chunk: prompt tokens per prefill call.
          mesh: the device mesh the model is sharded over; the cache is then created sharded too.
          bucket: pad the prompt length to a bucket (False: feed its exact length; for tests).
          kv_cache: the KV cache dtype (glm4_jax.config.KV_CACHE_DTYPES); "int8" halves its memory. Default: the
            model's dtype.
          cpu_layout: run from `cpu_params(model)` (the layers held apart, bf16 matrices converted to float32
            once). Default: when the model is on one CPU device and there is no mesh. False: the model's arrays.
        """
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cfg: Config = model.cfg
        if cpu_layout is None:
            devices = {d for x in jax.tree.leaves(nnx.state(model)) for d in x.devices()}
            cpu_layout = mesh is None and len(devices) == 1 and devices.pop().platform == "cpu"
        self.cpu_layout = bool(cpu_layout)
        self.graphdef, self.state = cpu_params(model) if self.cpu_layout else nnx.split(model)
        self.dtype = model.embed[...].dtype
        self.cache_dtype = self.dtype if kv_cache is None else jnp.dtype(self.cfg.cache_layout(1, 1, kv_cache)["k"][2])
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
        # For progress displays (the generate CLI's status lines): called as on_status("compile", name, static)
        # before a function compiles and on_status("compiled", name, static) after it, on_status("prefill",
        # tokens_done, tokens_total) before each prefill chunk and once at the end, and on_status("decode",
        # max_new_tokens) when the decode starts.
        self.on_status: Callable[..., None] | None = None

    def _status(self, *event) -> None:
        if self.on_status is not None:
            self.on_status(*event)

    # -- compilation cache

    def _call(self, name: str, static, fn: Callable, donate: tuple[int, ...], *args):
        """Runs jit(fn)(*args) (see `_compiled`)."""
        compiled = self._compiled(name, static, fn, donate, *args)
        with self._mesh_context():
            return compiled(*args)

    def _compiled(self, name: str, static, fn: Callable, donate: tuple[int, ...], *args, out_shardings=None):
        """jit(fn) compiled ahead of time for these arguments, once per model structure, argument shapes and
        shardings, and `static`. The cache is shared by all Generators (`clear_compiled`), so a new Generator (a
        new GLM4Chat in a notebook, a second CLI call in-process) of the same model reuses the executables.
        `out_shardings` (the engine's, so that a state fed back keeps its shardings) must follow from `static`
        and the arguments."""
        sig = tuple(
            (x.shape, str(x.dtype), getattr(x, "sharding", None))
            for a in args
            if a is not self.state
            for x in jax.tree.leaves(a)
        )
        key = (name, static, self.graphdef, self._state_sig, sig)
        compiled = _COMPILED.get(key)
        if compiled is None:
            self._status("compile", name, static)
            t = time.perf_counter()
            with self._mesh_context():
                extra = {} if out_shardings is None else {"out_shardings": out_shardings}
                jitted = jax.jit(fn, donate_argnums=donate, **extra)
                compiled = jitted.lower(*args).compile()
            self._compile_s += time.perf_counter() - t
            self._status("compiled", name, static)
            _COMPILED[key] = compiled
            self._keys.add(key)
        return compiled

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def compiled_count(self, name: str | None = None) -> int:
        """How many functions this Generator compiled ("prefill", "start", "loop", "step"), for tests of the
        bucketing."""
        return sum(1 for k in self._keys if name is None or k[0] == name)

    # -- prefill layout

    def prefill_sizes(
        self, lengths: Sequence[int], max_new_tokens: int, max_len: int | None = None
    ) -> tuple[list[int], int]:
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
        sizes = prefill_chunks(longest, self.prefill_chunk, limit=room, bucket=self.bucket)
        padded = sum(sizes)
        if max_len is None:
            max_len = min(-(-(padded + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND, cap)
        return sizes, max(max_len, padded)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.mesh is None:
            return KVCache.init(self.cfg, batch, max_len, self.cache_dtype)
        from glm4_jax.placement import init_cache

        return init_cache(self.cfg, self.mesh, batch, max_len, self.cache_dtype)

    def settings(
        self, sampling: SamplingParams | None, max_new_tokens: int, stop_ids: Sequence[int] | None
    ) -> DecodeSettings:
        """The static settings of one decode; stop ids default to the config's eos ids. Raises GenerationError."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = self.cfg.eos_token_ids if stop_ids is None else stop_ids
        return DecodeSettings(
            sampling=sampling or SamplingParams(),
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

    def _prefill(self, prompts, s: DecodeSettings, max_len, seed) -> tuple[DecodeState, list[int], int, int]:
        """Pads, runs the chunked prefill and chooses the first token. Returns (state, lengths, padded, max_len)."""
        prompts = self._check_prompts(prompts)
        lengths = [len(p) for p in prompts]
        sizes, max_len = self.prefill_sizes(lengths, s.max_new_tokens, max_len)
        padded = sum(sizes)
        tokens, positions = pad_left(prompts, padded, self.pad_id)
        B = len(prompts)
        cache = self.new_cache(B, max_len)
        start = 0
        logits = None
        for size in sizes:
            self._status("prefill", start, padded)
            chunk = (tokens[:, start : start + size], positions[:, start : start + size])
            logits, cache = self._call(
                "prefill", size, functools.partial(_prefill_chunk, self.graphdef), (1,), self.state, cache, *chunk
            )
            start += size
        self._status("prefill", start, padded)
        V = self.cfg.vocab_size if s.sampling.uses_penalty else 0
        seen = np.zeros((B, V), bool)
        if V:
            for b, p in enumerate(prompts):
                seen[b, p] = True
        key = jax.random.key(seed)
        lengths_arr = np.asarray(lengths, np.int32)
        d = self._call("start", s, functools.partial(_start, s), (0,), cache, logits, lengths_arr, seen, key)
        return d, lengths, padded, max_len

    def _result(self, s: DecodeSettings, out: np.ndarray, steps: int, lengths, padded, max_len, times, streamed):
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
        s = self.settings(sampling or SamplingParams(), max_new_tokens, stop_ids)
        c0, t0 = self._compile_s, time.perf_counter()
        d, lengths, padded, max_len = self._prefill(prompts, s, max_len, seed)
        jax.block_until_ready(d.tok)
        c1, t1 = self._compile_s, time.perf_counter()
        self._status("decode", s.max_new_tokens)
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
        s = self.settings(sampling or SamplingParams(), max_new_tokens, stop_ids)
        c0, t0 = self._compile_s, time.perf_counter()
        d, lengths, padded, max_len = self._prefill(prompts, s, max_len, seed)
        tok, done = jax.device_get((d.tok, d.done))
        c1, t1 = self._compile_s, time.perf_counter()
        steps, end = 1, padded
        step = None  # the compiled step: its argument shapes never change
        if steps < s.max_new_tokens and not done.all() and end < max_len:
            # compiled before the first token is shown, so that the text does not stall after its first token
            self._status("decode", s.max_new_tokens)
            step = self._compiled("step", s, functools.partial(_step, self.graphdef, s), (1,), self.state, d)
        outs = [tok]
        paused = 0.0  # time spent by the consumer between yields, not counted as decode time
        t = time.perf_counter()
        yield tok
        paused += time.perf_counter() - t
        while steps < s.max_new_tokens and not done.all() and end < max_len:
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
