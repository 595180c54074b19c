"""Continuous batching: requests join and leave a running batch of decode slots, with one compiled step.

The design is JetStream's (prefill, insert into a slot, one generate step for all slots):

1. `Slots` is the device state of `slots` decode rows: a KV cache whose `end` is per row ([B]: each row writes at
   its own slots), and per row the last token, its position, the tokens chosen so far, the budget, the sampling
   settings as arrays (`glm4_jax.sampling.RowSampling`), the stop ids ([B, MAX_STOP_IDS], -1 padded), the
   repetition record and the request's PRNG key. Rows with different settings share one compiled step: nothing
   about a request is static.
2. Prefill: a new request's prompt goes into a cache of its own (batch 1, `max_len` slots, a batch-wide `end`)
   with the `Generator`'s chunked, bucketed prefill (`glm4_jax.engine._prefill_chunk`, the same executables).
3. `_insert` copies that cache row into a free slot of `Slots` and chooses the first token from the prefill's
   logits; `Slots` is donated, so the other rows are not copied or touched.
4. `_decode_step` feeds every active row its last token and chooses the next with `glm4_jax.engine.pick`, the
   choice the static `Generator` makes too (one copy of sampling and stop logic). A row stops on a stop id, on
   its budget (max_new_tokens, capped by the free slots of the cache) or when cancelled; inactive rows feed
   padding (position -1, never visible) and do not advance.
5. `Engine` (host side) holds the queue, admits requests into free slots, evicts finished and cancelled ones and
   calls the per-token callbacks. The host reads the new tokens of each step ([B] ids and two [B] masks) and
   nothing else, by default only after the next step has been dispatched (`pipeline`), so the host's work
   overlaps the device's and a finished row is seen (and its slot freed) one step late; it sends nothing to a
   step unless a request was cancelled (the cancel mask). `submit` and `cancel`
   are thread-safe; `step` runs on one thread (`run_forever`).

Scheduling policy: each `step` runs at most one prefill chunk (`prefill_chunk` tokens, the first one bucketed)
and then one decode step over all slots. A long prompt is prefilled a chunk at a time between decode steps, so a
running stream waits at most one chunk's prefill (plus the insert) between two tokens, never the whole prompt.
One prompt is prefilled at a time, first come first served; a request is admitted when a slot is free.

Random keys: a request's n-th token draws with `fold_in(fold_in(key(seed), 0), n)`, the key of row 0 of a static
`Generator` batch, so a request's sampled ids depend on its seed only: they are the same alone, in any batch
and as the first prompt of `Generator.generate(..., seed=seed)`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm4_jax.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    GenerationError,
    Generator,
    _prefill_chunk,
    pad_left,
    pick,
)
from glm4_jax.model import GLM4, KVCache
from glm4_jax.sampling import RowSampling, SamplingParams, _penalized, _tempered

Array = jax.Array

MAX_STOP_IDS = 8  # stop ids per request (GLM-4 chat uses 3)
DEFAULT_SLOTS = 8
TOP_LOGPROBS = 20  # the most top log-probabilities a request may ask for per token


# ---- the device state and the compiled pieces ----------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The decode slots: the carry of `_decode_step` and the target of `_insert`."""

    cache: KVCache  # k, v [L, B, S, K, H], pos [B, S], end [B] (and k_scale, v_scale [L, B, S, K, 1] in int8)
    tok: Array  # [B] int32: the last token chosen, fed at the next step
    pos: Array  # [B] int32: the position `tok` takes
    n: Array  # [B] int32: tokens the row's request has chosen so far
    budget: Array  # [B] int32: the most tokens it may choose (max_new_tokens, capped by the cache)
    active: Array  # [B] bool: the row decodes (its request has not finished)
    seen: Array  # [B, V] bool: ids in the prompt or chosen (repetition penalty)
    key: Array  # [B] PRNG keys: token n of the row draws with fold_in(key, n)
    sampling: RowSampling  # [B] arrays
    stops: Array  # [B, MAX_STOP_IDS] int32, -1 padded

    @classmethod
    def init(cls, cache: KVCache, vocab: int) -> Slots:
        B = cache.pos.shape[0]
        return cls(
            cache=cache,
            tok=jnp.zeros((B,), jnp.int32),
            pos=jnp.zeros((B,), jnp.int32),
            n=jnp.zeros((B,), jnp.int32),
            budget=jnp.zeros((B,), jnp.int32),
            active=jnp.zeros((B,), bool),
            seen=jnp.zeros((B, vocab), bool),
            key=jax.random.split(jax.random.key(0), B),
            sampling=jax.tree.map(jnp.asarray, RowSampling.of([SamplingParams()] * B)),
            stops=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
        )


def _logprobs(logits: Array, rows: RowSampling, n_vocab: int, seen: Array, tok: Array):
    """Log-probabilities of the distribution the sampler draws from (repetition penalty, vocabulary mask and
    temperature applied; greedy rows: the penalized logits; top-k and top-p not applied): (of `tok` [B], the
    TOP_LOGPROBS most probable ids [B, K] int32, their log-probabilities [B, K])."""
    lp = jax.nn.log_softmax(_tempered(_penalized(logits, rows, n_vocab, seen), rows), axis=-1)
    chosen = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
    return chosen, top_ids.astype(jnp.int32), top_lp


def _decode_step(graphdef, n_vocab: int, pad_id: int, state, s: Slots, cancel: Array):
    """One token for every active slot.

    Args:
      s: the slots (donated).
      cancel: [B] bool, rows to stop before this step (cancelled from outside).
    Returns:
      (slots, tokens [B] int32 (the pad id on rows that did not decode), emitted [B] bool (the row decoded),
      finished [B] bool (the row's request ended with this token), logprobs (`_logprobs` of the tokens)).
    """
    model = nnx.merge(graphdef, state)
    active = s.active & ~cancel
    tokens = jnp.where(active, s.tok, pad_id)[:, None]  # [B, 1]
    positions = jnp.where(active, s.pos, -1)[:, None]  # [B, 1]: -1 is never visible
    logits, cache = model(tokens, positions, s.cache, logits="last")
    cache = dataclasses.replace(cache, end=jnp.where(active, cache.end, s.cache.end))
    tok, hit, seen = pick(logits[:, 0], s.key, s.n, s.sampling, n_vocab, s.seen, s.stops)
    lp = _logprobs(logits[:, 0], s.sampling, n_vocab, s.seen, tok)
    n = s.n + active
    finished = active & (hit | (n >= s.budget))
    s = dataclasses.replace(
        s,
        cache=cache,
        tok=jnp.where(active, tok, s.tok),
        pos=s.pos + active,
        n=n,
        active=active & ~finished,
        seen=seen,
    )
    return s, jnp.where(active, tok, pad_id), active, finished, lp


def _set_row(big, row, slot: Array, axis: int = 0):
    """Writes `row` (size 1 along `axis`) into `big` at index `slot` of that axis, leaf by leaf."""

    def put(b, r):
        idx = [jnp.zeros((), jnp.int32)] * b.ndim
        idx[axis] = slot
        return jax.lax.dynamic_update_slice(b, r.astype(b.dtype), tuple(idx))

    return jax.tree.map(put, big, row)


def _insert(
    n_vocab: int,
    s: Slots,
    pcache: KVCache,
    logits: Array,
    slot: Array,
    length: Array,
    budget: Array,
    key: Array,
    sampling: RowSampling,
    stops: Array,
    seen: Array,
):
    """Puts a prefilled request into row `slot` of the slots (donated) and chooses its first token.

    Args:
      pcache: the request's cache (row 0 of P rows, the slots' length, a batch-wide `end`).
      logits: [P, V] the prefill's last logits (row 0 is the request's).
      slot, length, budget: [] int32: the row, the prompt's length (the next position), the token budget.
      key: [1] the request's PRNG key; sampling: [1] arrays; stops [1, MAX_STOP_IDS]; seen [1, V] (the prompt).
    Returns:
      (slots, first token [] int32, finished [] bool, logprobs (`_logprobs` of the token, batch 1)).
    """
    zero = jnp.zeros((1,), jnp.int32)
    lp = functools.partial(_logprobs, logits[:1], sampling, n_vocab, seen)
    tok, hit, seen = pick(logits[:1], key, zero, sampling, n_vocab, seen, stops)
    finished = hit[0] | (budget <= 1)
    # k, v (and an int8 cache's k_scale, v_scale) [L, 1, S, K, *] are rows along axis 1, pos [1, S] along axis 0
    rows = {f: getattr(pcache, f) for f in ("k", "v", "k_scale", "v_scale") if getattr(pcache, f) is not None}
    cache = dataclasses.replace(
        s.cache,
        **{f: _set_row(getattr(s.cache, f), x[:, :1], slot, axis=1) for f, x in rows.items()},
        pos=_set_row(s.cache.pos, pcache.pos[:1], slot),
        end=s.cache.end.at[slot].set(pcache.end),
    )
    row = dict(
        tok=tok,
        pos=length[None],
        n=zero + 1,
        budget=budget[None],
        active=~finished[None],
        seen=seen,
        sampling=sampling,
        stops=stops,
    )
    fields = {name: _set_row(getattr(s, name), value, slot) for name, value in row.items()}
    s = dataclasses.replace(s, cache=cache, key=s.key.at[slot].set(key[0]), **fields)
    return s, tok[0], finished, lp(tok)


# ---- requests ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request. Filled in by the engine; read it after `finished` (or in the callbacks)."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]
    on_token: Callable[[Request, int], None] | None = None  # called on the engine thread, once per new id
    on_done: Callable[[Request], None] | None = None  # called once when it ends (any reason)
    logprobs: int | None = None  # None: no log-probabilities; k: each id's and the top k (<= TOP_LOGPROBS)
    ids: list[int] = dataclasses.field(default_factory=list)  # generated ids (a stop id included)
    stop_reason: str | None = None  # "stop_id", "max_new_tokens", "cache_full" or "cancelled"
    budget: int = 0  # the tokens it may choose: max_new_tokens, or fewer when its prompt leaves less cache
    t_submit: float = 0.0  # time.perf_counter() at submit
    token_times: list[float] = dataclasses.field(default_factory=list)  # perf_counter() when each id was read
    token_logprobs: list[float] = dataclasses.field(default_factory=list)  # with `logprobs`: each id's (`_logprobs`)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # the top k per id
    _done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _cancel: bool = False

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request has ended (another thread runs the engine); False on timeout."""
        return self._done.wait(timeout)


@dataclasses.dataclass
class _Prefill:
    """A request whose prompt is going into its own cache, a chunk per engine step."""

    request: Request
    slot: int
    tokens: np.ndarray  # [P, padded] int32: the prompt in row 0 (P > 1 on some meshes: padding rows)
    positions: np.ndarray  # [P, padded] int32
    sizes: list[int]  # chunk lengths still to feed
    cache: KVCache
    logits: Array | None = None
    offset: int = 0


# ---- the engine -------------------------------------------------------------------------------------------------


class Engine:
    """Continuous batching over `slots` decode rows of `max_len` cache slots each (see the module docstring).

    engine = Engine(model, slots=8)
    req = engine.submit(ids, max_new_tokens=64, sampling=SamplingParams(temperature=0.8), seed=1,
                        on_token=lambda r, t: print(t))
    engine.run_until_idle()          # or run_forever(stop_event) on a thread of its own
    req.ids, req.stop_reason
    """

    def __init__(
        self,
        model: GLM4,
        *,
        slots: int = DEFAULT_SLOTS,
        max_len: int | None = None,
        n_vocab: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        mesh: jax.sharding.Mesh | None = None,
        pipeline: bool = True,
        kv_cache: str | None = None,
        cpu_layout: bool | None = None,
    ):
        """
        Args:
          model: the model (its parameters may be sharded over `mesh`).
          slots: decode rows (requests decoding at once).
          max_len: cache slots per row (a prompt's padded length plus its tokens); default the model's context.
          n_vocab: ids >= n_vocab are never sampled (default `glm4_jax.engine.default_n_vocab`).
          prefill_chunk: prompt tokens per prefill call, and so the most prefill work between two decode steps.
          mesh: the device mesh the model is sharded over.
          pipeline: dispatch each decode step before reading the ids of the one before (the host's work overlaps
            the device's; a request's end is seen one step late).
          kv_cache: the KV cache dtype (glm4_jax.config.KV_CACHE_DTYPES), as `Generator`'s; "int8" halves its memory.
            Default: the model's dtype.
          cpu_layout: as `Generator`'s (default: on one CPU device, the layers apart and float32 matrices).
        """
        self.gen = Generator(
            model,
            n_vocab=n_vocab,
            prefill_chunk=prefill_chunk,
            mesh=mesh,
            kv_cache=kv_cache,
            cpu_layout=cpu_layout,
        )
        self.cfg = self.gen.cfg
        self.slots = int(slots)
        self.max_len = int(max_len or self.cfg.max_seq_len)
        if not 1 <= self.max_len <= self.cfg.max_seq_len:
            raise GenerationError(f"max_len {self.max_len} is outside [1, {self.cfg.max_seq_len}]")
        self.mesh = mesh
        self._sh = self._shardings()
        self._prefill_rows = self._prefill_batch()
        cache = self._new_cache(self.slots, per_row=True)
        init = functools.partial(Slots.init, vocab=self.cfg.vocab_size)
        if self._sh is None:
            self._state = init(cache)
        else:
            self._state = jax.jit(init, out_shardings=self._sh)(cache)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._prefill: _Prefill | None = None
        self._pending = None  # a dispatched decode step whose ids are not read yet
        self.pipeline = pipeline
        self._ids = itertools.count()
        self.steps = 0  # decode steps run
        # The cancel mask of a step: a device array made once, so that a step without cancellations (nearly all)
        # sends nothing from the host (tests/test_decode_hlo.py checks it with a transfer guard).
        self._no_cancel = self._device_mask(np.zeros(self.slots, bool))

    # -- placement

    def _shardings(self) -> Slots | None:
        """The shardings of `Slots` on the mesh: the cache by the rules, the small per-row arrays replicated."""
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding, PartitionSpec

        from glm4_jax.placement import cache_shardings

        cache = cache_shardings(self.cfg, self.mesh, self.slots, self.max_len, dtype=self.gen.cache_dtype, per_row=True)
        shapes = jax.eval_shape(
            lambda: Slots.init(KVCache.init(self.cfg, self.slots, 1, per_row=True), self.cfg.vocab_size)
        )
        rep = NamedSharding(self.mesh, PartitionSpec())
        return dataclasses.replace(jax.tree.map(lambda _: rep, shapes), cache=cache)

    def _prefill_batch(self) -> int:
        """Rows of a prefill: 1, or on a mesh that splits the batch (data, fsdp) the fewest it can split. Row 0
        holds the prompt, the others padding: each device prefills one row, so the padding costs no time."""
        if self.mesh is None:
            return 1
        from glm4_jax.placement import cache_shardings
        from glm4_jax.sharding.rules import ShardingError

        for b in range(1, self.mesh.size + 1):
            try:
                cache_shardings(self.cfg, self.mesh, b, self.max_len)
                return b
            except ShardingError:
                continue
        raise GenerationError(f"no prefill batch fits the mesh {dict(self.mesh.shape)}")

    def _device_mask(self, mask: np.ndarray) -> Array:
        """A [slots] host mask on the device (replicated on a mesh), as the compiled step takes it."""
        if self.mesh is None:
            return jax.device_put(mask)
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(mask, NamedSharding(self.mesh, PartitionSpec()))

    def _new_cache(self, batch: int, per_row: bool = False) -> KVCache:
        if self.mesh is None:
            return KVCache.init(self.cfg, batch, self.max_len, self.gen.cache_dtype, per_row=per_row)
        from glm4_jax.placement import init_cache

        return init_cache(self.cfg, self.mesh, batch, self.max_len, self.gen.cache_dtype, per_row=per_row)

    def compiled_count(self, name: str | None = None) -> int:
        """Executables this engine compiled: "prefill" (one per chunk length), "insert", "step"."""
        return self.gen.compiled_count(name)

    # -- the thread-safe side: submit and cancel

    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        on_token: Callable[[Request, int], None] | None = None,
        on_done: Callable[[Request], None] | None = None,
        logprobs: int | None = None,
    ) -> Request:
        """Queues a request (any thread). Raises GenerationError for a request that can never run. With
        `logprobs` k, each new id's log-probability and the top k go into `token_logprobs` and `top_logprobs`
        before `on_token` is called."""
        if logprobs is not None and not 0 <= logprobs <= TOP_LOGPROBS:
            raise GenerationError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {logprobs}")
        (prompt,) = self.gen._check_prompts([prompt])
        s = self.gen.settings(sampling, max_new_tokens, stop_ids)
        if len(s.stop_ids) > MAX_STOP_IDS:
            raise GenerationError(f"at most {MAX_STOP_IDS} stop ids, got {len(s.stop_ids)}")
        self.gen.prefill_sizes([len(prompt)], s.max_new_tokens, self.max_len)  # raises PromptTooLongError
        req = Request(
            id=next(self._ids),
            prompt=prompt,
            max_new_tokens=s.max_new_tokens,
            sampling=s.sampling,
            seed=int(seed),
            stop_ids=s.stop_ids,
            on_token=on_token,
            on_done=on_done,
            logprobs=logprobs,
            t_submit=time.perf_counter(),
        )
        with self._wake:
            self._queue.append(req)
            self._wake.notify()
        return req

    def cancel(self, request: Request) -> None:
        """Stops a request (any thread): it ends with stop_reason "cancelled" at the engine's next step."""
        with self._wake:
            request._cancel = True
            self._wake.notify()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not (self._queue or self._running or self._prefill or self._pending)

    # -- the engine thread

    def step(self) -> None:
        """One round: cancellations, one prefill chunk (admitting a queued request into a free slot), and one
        decode step of every running slot. Callbacks run here."""
        with self._lock:
            queued = [r for r in self._queue if r._cancel]
            for r in queued:
                self._queue.remove(r)
        for r in queued:
            self._finish(r, "cancelled")
        if self._prefill is not None and self._prefill.request._cancel:
            self._finish(self._prefill.request, "cancelled")
            self._prefill = None
        cancel = np.zeros(self.slots, bool)
        for slot, r in self._running.items():
            cancel[slot] = r._cancel
        prev, self._pending = self._pending, None
        if self._running:
            self._decode(cancel)  # dispatched first; its ids are read after the prefill chunk is dispatched
        self._prefill_work()
        if prev is not None:  # pipelined: the ids of the step before, while this one runs
            self._read_decode(prev)
        if not self.pipeline and self._pending is not None:
            prev, self._pending = self._pending, None
            self._read_decode(prev)

    def _decode(self, cancel: np.ndarray) -> None:
        fn = functools.partial(_decode_step, self.gen.graphdef, self.gen.n_vocab, self.gen.pad_id)
        sh = None if self._sh is None else (self._sh, None, None, None, None)
        mask = self._device_mask(cancel) if cancel.any() else self._no_cancel
        step = self.gen._compiled("step", (), fn, (1,), self.gen.state, self._state, mask, out_shardings=sh)
        with self.gen._mesh_context():
            self._state, tok, emitted, finished, lp = step(self.gen.state, self._state, mask)
        self._pending = (tok, emitted, finished, lp, cancel, dict(self._running))
        self.steps += 1

    def _read_decode(self, pending) -> None:
        """Hands out the ids of a decode step to the requests that ran in it, and evicts those that ended."""
        tok, emitted, finished, lp, cancel, ran = pending
        if not any(r.logprobs is not None for r in ran.values()):
            lp = None  # read only when a request asks
        tok, emitted, finished, lp = jax.device_get((tok, emitted, finished, lp))
        now = time.perf_counter()
        for slot, r in ran.items():
            if r.finished:  # ended at the step before (the host learns it one step late when pipelined)
                continue
            if emitted[slot]:
                self._emit(r, int(tok[slot]), now, None if lp is None else [x[slot] for x in lp])
            if cancel[slot] or finished[slot]:
                if self._running.get(slot) is r:
                    del self._running[slot]
                self._finish(r, "cancelled" if cancel[slot] else self._reason(r))

    def _prefill_work(self) -> None:
        """Starts the prefill of the next queued request when a slot is free, and feeds one chunk of it."""
        if self._prefill is None:
            busy = set(self._running)
            free = [b for b in range(self.slots) if b not in busy]
            with self._lock:
                req = self._queue.popleft() if free and self._queue else None
            if req is None:
                return
            sizes, _ = self.gen.prefill_sizes([len(req.prompt)], req.max_new_tokens, self.max_len)
            rows = [req.prompt] + [[]] * (self._prefill_rows - 1)  # padding rows (positions < 0) on a mesh
            tokens, positions = pad_left(rows, sum(sizes), self.gen.pad_id)
            cache = self._new_cache(self._prefill_rows)
            self._prefill = _Prefill(req, free[0], tokens, positions, sizes, cache)
        p = self._prefill
        size = p.sizes.pop(0)
        chunk = (p.tokens[:, p.offset : p.offset + size], p.positions[:, p.offset : p.offset + size])
        fn = functools.partial(_prefill_chunk, self.gen.graphdef)
        p.logits, p.cache = self.gen._call("prefill", size, fn, (1,), self.gen.state, p.cache, *chunk)
        p.offset += size
        if not p.sizes:
            self._prefill = None
            self._insert(p)

    def _insert(self, p: _Prefill) -> None:
        r = p.request
        padded = p.offset
        budget = min(r.max_new_tokens, self.max_len - padded + 1)
        seen = np.zeros((1, self.cfg.vocab_size), bool)
        seen[0, r.prompt] = True
        stops = np.full((1, MAX_STOP_IDS), -1, np.int32)
        stops[0, : len(r.stop_ids)] = r.stop_ids
        key = jax.random.fold_in(jax.random.key(r.seed), 0)[None]
        args = (
            self._state,
            p.cache,
            p.logits,
            np.int32(p.slot),
            np.int32(len(r.prompt)),
            np.int32(budget),
            key,
            RowSampling.of([r.sampling]),
            stops,
            seen,
        )
        sh = None if self._sh is None else (self._sh, None, None, None)
        fn = functools.partial(_insert, self.gen.n_vocab)
        insert = self.gen._compiled("insert", (), fn, (0,), *args, out_shardings=sh)
        with self.gen._mesh_context():
            self._state, tok, finished, lp = insert(*args)
        tok, finished, lp = jax.device_get((tok, finished, lp if r.logprobs is not None else None))
        r.budget = budget
        self._emit(r, int(tok), time.perf_counter(), None if lp is None else [x[0] for x in lp])
        if finished:
            self._finish(r, self._reason(r))
        else:
            self._running[p.slot] = r

    def _emit(self, r: Request, tok: int, now: float, lp=None) -> None:
        """Hands out one id; `lp` is its row of `_logprobs` (host arrays) when the request asked for them."""
        if r.logprobs is not None and lp is not None:
            chosen, ids, vals = lp
            r.token_logprobs.append(float(chosen))
            r.top_logprobs.append(
                [(int(i), float(v)) for i, v in zip(ids[: r.logprobs], vals[: r.logprobs], strict=True)]
            )
        r.ids.append(tok)
        r.token_times.append(now)
        if r.on_token is not None:
            r.on_token(r, tok)

    def _reason(self, r: Request) -> str:
        if r.ids and r.ids[-1] in r.stop_ids:
            return "stop_id"
        return "max_new_tokens" if len(r.ids) >= r.max_new_tokens else "cache_full"

    def _finish(self, r: Request, reason: str) -> None:
        r.stop_reason = reason
        r._done.set()
        if r.on_done is not None:
            r.on_done(r)

    def run_until_idle(self) -> None:
        """Steps until no request is queued, prefilling or running."""
        while not self.idle:
            self.step()

    def run_forever(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Steps until `stop` is set, sleeping while there is nothing to do (for a thread of its own)."""
        while not stop.is_set():
            if self.idle:
                with self._wake:
                    self._wake.wait(idle_wait)
                continue
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[Request]:
        """Submits every prompt with the same settings (`submit`'s keyword arguments) and runs them to the end."""
        reqs = [self.submit(p, **kwargs) for p in prompts]
        self.run_until_idle()
        return reqs
