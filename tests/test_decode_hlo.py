"""The compiled decode steps, read from their HLO: the executables that `Generator.stream` (its per-token `_step`),
`Generator.generate` (its `_loop`) and the continuous-batching `Engine` (`_decode_step`) really run, taken from
the shared compilation cache after a tiny generation.

1. No host transfer inside a step (no infeed/outfeed/send/recv, no host callback), and on the Python side one
   read per step of the new ids (and done masks) only, nothing sent: checked with a transfer guard.
2. The cache is updated in place: its buffers are donated and aliased to the output, and no instruction of the
   step produces a cache-sized array but the in-place update (no copy, transpose or convert of the cache).
3. Each check fails on a broken step (a host callback, no donation, a copying cache write): the negative
   controls below compile the real step functions with the fault put in.

The bf16 cache on CPU: XLA's CPU backend has no bfloat16 dynamic-update-slice, so it converts the whole cache
to float32 and back around every write (a full pass per layer and token; this backend only, GPUs update bf16 in
place). The strict in-place check runs on float32 and int8 caches; the bf16 one checks everything but that
conversion (`CPU_BF16_UPCAST`).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import sharpen

from glm4_jax import engine as engine_mod
from glm4_jax import kernels
from glm4_jax.batching import Engine
from glm4_jax.engine import Generator
from glm4_jax.fixtures import GQA6

CFG = GQA6.replace(num_layers=2)
PROMPTS = [[5, 6, 7, 8], [9, 10]]
HOST_OPS = {"infeed", "outfeed", "send", "send-done", "recv", "recv-done"}
HOST_TARGETS = re.compile(r"callback|host", re.IGNORECASE)  # xla_python_cpu_callback, MoveToHost, ...
# Ops that pass a cache buffer along without touching its elements.
PASS_THROUGH = {"parameter", "get-tuple-element", "tuple", "while", "bitcast", "conditional", "call", "opt-barrier"}
IN_PLACE_ROOTS = {"dynamic-update-slice", "scatter"}
HLO_DTYPES = {"bfloat16": "bf16", "float32": "f32", "int8": "s8", "float16": "f16", "int32": "s32"}

_COMP = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+([a-z][a-z0-9-]*)\((.*)$")


# ---- reading compiled HLO -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type, e.g. "bf16[2,1,128,2,16]{4,3,2,1,0}" or a tuple
    op: str
    rest: str  # operands and attributes
    root: bool


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation name: its instructions}, the entry computation's name) of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            comps[current].append(Instr(m.group(2), m.group(3), m.group(4), m.group(5), bool(m.group(1))))
    return comps, entry


def host_transfers(text: str) -> list[str]:
    """The instructions of a module that move data to or from the host."""
    comps, _ = parse_hlo(text)
    found = []
    for instrs in comps.values():
        for i in instrs:
            target = re.search(r'custom_call_target="([^"]*)"', i.rest)
            if i.op in HOST_OPS or (i.op == "custom-call" and target and HOST_TARGETS.search(target.group(1))):
                found.append(f"{i.op} {target.group(1) if target else ''}".strip())
    return found


def type_string(x) -> str:
    return f"{HLO_DTYPES[jnp.dtype(x.dtype).name]}[{','.join(map(str, x.shape))}]"


def aliased_parameter_types(text: str) -> list[str]:
    """The types (e.g. "bf16[2,1,128,2,16]") of the entry parameters aliased to an output (donated and reused)."""
    header = text.splitlines()[0]
    m = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", header)
    numbers = {int(n) for n in re.findall(r":\s*\((\d+),", m.group(1))} if m else set()
    comps, entry = parse_hlo(text)
    types = []
    for i in comps[entry]:
        if i.op == "parameter" and int(re.match(r"(\d+)", i.rest).group(1)) in numbers:
            types.append(i.shape.split("{")[0])
    return types


def cache_writes(text: str, cache_types: set[str]) -> list[tuple[str, str]]:
    """(op, what it is) of every instruction outside fused computations whose result holds an array of one of
    `cache_types` and that is not a pass-through: a fusion is named by its root (and the root's operand's op when
    the root is a convert), so an in-place update reads ("fusion", "dynamic-update-slice")."""
    comps, _ = parse_hlo(text)
    fused = {c for instrs in comps.values() for i in instrs for c in re.findall(r"calls=%([\w.\-]+)", i.rest)}
    out = []
    for name, instrs in comps.items():
        if name in fused:
            continue
        for i in instrs:
            if i.op in PASS_THROUGH or not any(t + "{" in i.shape or t + " " in i.shape for t in cache_types):
                continue
            what = i.op
            if i.op == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", i.rest).group(1)
                body = {x.name: x for x in comps[called]}
                root = next(x for x in comps[called] if x.root)
                what = root.op
                if root.op == "convert":  # the CPU's bf16 round trip: convert(update(convert(cache)))
                    operand = body.get(re.match(r"%([\w.\-]+)", root.rest).group(1))
                    what = f"convert of {operand.op if operand else '?'}"
            out.append((i.op, what))
    return out


# convert(update(convert(cache))) in one fusion, or (the engine's scatter) the converts as fusions of their own
CPU_BF16_UPCAST = {("fusion", f"convert of {op}") for op in (*IN_PLACE_ROOTS, "parameter")}


def check_in_place(compiled, cache, *, allow=frozenset()) -> None:
    """The cache's buffers are aliased to the output and only updated in place."""
    text = compiled.as_text()
    arrays = [a for a in (cache.k, cache.v, cache.k_scale, cache.v_scale) if a is not None]
    types = [type_string(a) for a in arrays]
    aliased = aliased_parameter_types(text)
    for t in set(types):
        assert aliased.count(t) >= types.count(t), f"the cache arrays {t} are not donated/aliased: {aliased}"
    cache_bytes = sum(a.nbytes for a in arrays)
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes
    writes = cache_writes(text, set(types))
    print(f"cache {types}: aliased; writes {sorted(set(writes))}")
    assert writes, "no cache write found (the parser missed it)"
    ok = {("fusion", r) for r in IN_PLACE_ROOTS} | {(r, r) for r in IN_PLACE_ROOTS} | set(allow)
    bad = [w for w in writes if w not in ok]
    assert not bad, f"the step copies the cache: {bad}"


# ---- the real steps ---------------------------------------------------------------------------------------------


def compiled_of(gen: Generator, name: str):
    (key,) = [k for k in gen._keys if k[0] == name]
    return engine_mod._COMPILED[key]


def model_of(dtype: str):
    from glm4_jax.model import init_model

    return sharpen(init_model(CFG.replace(dtype=dtype), seed=1))


@pytest.fixture(scope="module", params=[("float32", None), ("bfloat16", None), ("bfloat16", "int8")])
def setting(request):
    return request.param


@pytest.fixture(scope="module")
def steps(setting):
    """{"step", "loop", "engine": (compiled, cache of its input)} after a tiny stream, generate and engine run."""
    dtype, kv = setting
    # Compiled executables are shared across Generators, and a Generator records only what it compiles itself:
    # start empty, so that what an earlier test compiled for the same shapes is compiled (and recorded) here.
    engine_mod.clear_compiled()
    model = model_of(dtype)
    gen = Generator(model, prefill_chunk=16, kv_cache=kv)
    gen.generate_streaming(PROMPTS, max_new_tokens=3, stop_ids=())
    gen.generate(PROMPTS, max_new_tokens=3, stop_ids=())
    eng = Engine(model, slots=2, max_len=64, prefill_chunk=16, kv_cache=kv)
    eng.generate(PROMPTS, max_new_tokens=3, stop_ids=())
    d_cache = gen.new_cache(len(PROMPTS), 128)
    return {
        "step": (compiled_of(gen, "step"), d_cache),
        "loop": (compiled_of(gen, "loop"), d_cache),
        "engine": (compiled_of(eng.gen, "step"), eng._state.cache),
    }


@pytest.mark.parametrize("name", ["step", "loop", "engine"])
def test_no_host_transfer_in_the_compiled_step(steps, name):
    compiled, _ = steps[name]
    assert host_transfers(compiled.as_text()) == []


@pytest.mark.parametrize("name", ["step", "loop", "engine"])
def test_cache_donated_and_updated_in_place(steps, setting, name):
    compiled, cache = steps[name]
    allow = CPU_BF16_UPCAST if setting == ("bfloat16", None) and jax.default_backend() == "cpu" else frozenset()
    check_in_place(compiled, cache, allow=allow)


# ---- host reads per step ----------------------------------------------------------------------------------------


class Reads:
    """Counts `jax.device_get` calls and the bytes they read."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        real = jax.device_get

        def counted(x):
            out = real(x)
            self.calls.append(sum(np.asarray(a).nbytes for a in jax.tree.leaves(out)))
            return out

        monkeypatch.setattr(jax, "device_get", counted)


def test_stream_reads_only_the_new_ids_per_step(monkeypatch):
    gen = Generator(model_of("float32"), prefill_chunk=16)
    it = gen.stream(PROMPTS, max_new_tokens=6, stop_ids=())
    next(it)  # the prefill (it sends the prompt) and the first token
    reads = Reads(monkeypatch)
    n = 0
    with jax.transfer_guard("disallow"):  # implicit transfers either way raise; device_get is explicit
        for _ in it:
            n += 1
    B = len(PROMPTS)
    assert n == 5
    assert reads.calls == [B * (4 + 1)] * n  # the [B] int32 ids and the [B] done mask, once per step


def test_engine_step_reads_only_the_new_ids_and_sends_nothing(monkeypatch):
    eng = Engine(model_of("float32"), slots=2, max_len=64, prefill_chunk=16)
    reqs = [eng.submit(p, max_new_tokens=8, stop_ids=()) for p in PROMPTS]
    while eng._queue or eng._prefill is not None:
        eng.step()
    assert len(eng._running) == 2
    reads = Reads(monkeypatch)
    steps = 0
    with jax.transfer_guard("disallow"):
        for _ in range(4):
            eng.step()
            steps += 1
    # pipelined: each step reads the step before's [B] ids and two [B] masks, one device_get
    assert reads.calls == [eng.slots * (4 + 1 + 1)] * steps
    eng.cancel(reqs[0])  # a cancellation is the one thing sent, explicitly
    with jax.transfer_guard("disallow"):
        eng.run_until_idle()
    assert reqs[0].stop_reason == "cancelled" and reqs[1].stop_reason == "max_new_tokens"


# ---- each check can fail --------------------------------------------------------------------------------------


def _tiny_gen():
    gen = Generator(model_of("float32"), prefill_chunk=16)
    s = gen.settings(None, 4, ())
    d, *_ = gen._prefill(PROMPTS, s, None, 0)
    return gen, s, d


def test_checks_catch_a_host_callback():
    gen, s, d = _tiny_gen()

    def leaky(graphdef, s, state, d):
        d = engine_mod._step(graphdef, s, state, d)
        jax.debug.callback(lambda tok: None, d.tok)
        return d

    fn = functools.partial(leaky, gen.graphdef, s)
    text = jax.jit(fn, donate_argnums=(1,)).lower(gen.state, d).compile().as_text()
    assert host_transfers(text)


def test_checks_catch_a_missing_donation():
    gen, s, d = _tiny_gen()
    fn = functools.partial(engine_mod._step, gen.graphdef, s)
    compiled = jax.jit(fn).lower(gen.state, d).compile()
    with pytest.raises(AssertionError, match="not donated"):
        check_in_place(compiled, d.cache)


def test_checks_catch_a_copying_cache_write(monkeypatch):
    """The engine's step with the per-row write left to `vmap` (as it was): XLA copied the whole cache into a
    batch-major layout and back."""

    batch_wide = kernels.write_kv

    def vmapped(ck, cv, k, v, layer, start):
        if jnp.ndim(start) == 0:  # the prefill's
            return batch_wide(ck, cv, k, v, layer, start)
        zero = jnp.zeros((), jnp.int32)

        def row(c, x, s):
            return jax.lax.dynamic_update_slice(c, x[None].astype(c.dtype), (layer, s, zero, zero))

        write = jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)
        return write(ck, k, start), write(cv, v, start)

    monkeypatch.setattr(kernels, "write_kv", vmapped)
    engine_mod.clear_compiled()
    eng = Engine(model_of("bfloat16"), slots=2, max_len=64, prefill_chunk=16)
    eng.generate([PROMPTS[0]], max_new_tokens=2, stop_ids=())
    compiled = compiled_of(eng.gen, "step")
    engine_mod.clear_compiled()
    with pytest.raises(AssertionError, match="copies the cache"):
        check_in_place(compiled, eng._state.cache, allow=CPU_BF16_UPCAST)


# ---- the per-row write equals the dynamic_update_slice it replaces -----------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_per_row_write_equals_row_by_row_updates(dtype):
    L, B, S, K, H, T = 3, 4, 10, 2, 4, 2
    rng = np.random.RandomState(0)
    ck = jnp.asarray(rng.randn(L, B, S, K, H) * 10).astype(dtype)
    new = jnp.asarray(rng.randn(B, T, K, H) * 10).astype(dtype)
    start = jnp.asarray([0, 3, 8, 9], jnp.int32)  # the last two run past the end: clamped, as the update is
    out, out2 = kernels.write_kv(ck, ck, new, new, jnp.int32(1), start)
    expect = np.asarray(ck).copy()
    for b in range(B):
        s = min(int(start[b]), S - T)
        expect[1, b, s : s + T] = np.asarray(new)[b]
    np.testing.assert_array_equal(np.asarray(out), expect)
    np.testing.assert_array_equal(np.asarray(out2), expect)
