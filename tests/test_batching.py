"""The continuous-batching engine: a request's ids are the same alone, in a running batch and from the static
Generator; one compiled step whatever the mix of requests; stops, budgets, cancellation, callbacks; meshes."""

import threading

import numpy as np
import pytest
from tiny import sharpen

from glm4_jax.batching import MAX_STOP_IDS, Engine
from glm4_jax.engine import GenerationError, Generator, PromptTooLongError, clear_compiled
from glm4_jax.fixtures import GQA6, SHARDABLE
from glm4_jax.model import init_model
from glm4_jax.sampling import SamplingParams

TINY = GQA6.replace(num_layers=2)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3)
MIXED = [
    SamplingParams(),
    SAMPLED,
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.2, top_p=0.8),
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(temperature=1.0, top_k=5),
]


@pytest.fixture(scope="module")
def model():
    return sharpen(init_model(TINY, seed=1))


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model, prefill_chunk=16)


def _prompt(n, seed=0, vocab=TINY.vocab_size):
    return np.random.RandomState(seed).randint(3, vocab, n).tolist()


def _alone(gen, prompt, **kw):
    """The static Generator's ids for one prompt (the reference)."""
    res = gen.generate([prompt], **kw)
    return res.ids[0], res.stop_reasons[0]


@pytest.mark.parametrize("seed, pipeline", [(0, True), (1, True), (2, False)])
def test_greedy_and_sampled_ids_alone_equal_ids_in_a_running_batch(model, gen, seed, pipeline):
    """Requests of mixed prompt lengths, budgets and settings start at random steps; some finish early (a stop id,
    a small budget), some are cancelled; every request that is not cancelled gets exactly its ids alone."""
    rng = np.random.RandomState(seed)
    engine = Engine(model, slots=3, max_len=96, prefill_chunk=16, pipeline=pipeline)
    n = 7
    specs = []
    for i in range(n):
        specs.append(
            dict(
                prompt=_prompt(int(rng.randint(1, 50)), seed * 100 + i),
                max_new_tokens=int(rng.randint(1, 14)),
                sampling=MIXED[int(rng.randint(len(MIXED)))],
                seed=int(rng.randint(1000)),
                stop_ids=(),
            )
        )
    # One request stops on a stop id: the 3rd token it would choose alone.
    free, _ = _alone(gen, specs[0]["prompt"], **{k: v for k, v in specs[0].items() if k != "prompt"})
    specs[0]["stop_ids"] = (free[min(2, len(free) - 1)],)
    arrivals = sorted(int(a) for a in rng.randint(0, 12, n))
    cancel_at = {int(rng.randint(n)): int(rng.randint(1, 4))}  # request -> steps after its arrival
    reqs, step = {}, 0
    while step < 200 and (len(reqs) < n or not engine.idle):
        for i in range(n):
            if arrivals[i] == step:
                reqs[i] = engine.submit(**specs[i])
            if i in cancel_at and i in reqs and arrivals[i] + cancel_at[i] == step:
                engine.cancel(reqs[i])
        engine.step()
        step += 1
    assert engine.idle and len(reqs) == n
    for i, spec in enumerate(specs):
        r = reqs[i]
        assert r.finished
        want, reason = _alone(gen, spec["prompt"], **{k: v for k, v in spec.items() if k != "prompt"})
        if r.stop_reason == "cancelled":
            assert i in cancel_at
            assert r.ids == want[: len(r.ids)]  # what it had got until then
        else:
            assert r.ids == want, (i, spec)
            assert r.stop_reason == reason
    assert reqs[0].stop_reason in ("stop_id", "cancelled")


def test_sampled_ids_depend_on_the_seed_only(model):
    engine = Engine(model, slots=4, max_len=64, prefill_chunk=16)
    p = _prompt(9, 3)
    kw = dict(max_new_tokens=10, sampling=SAMPLED, stop_ids=())
    alone = engine.generate([p], seed=4, **kw)[0].ids
    crowd = [engine.submit(_prompt(20, 5), seed=9, **kw), engine.submit(p, seed=4, **kw)]
    crowd.append(engine.submit(p, seed=5, **kw))
    engine.run_until_idle()
    assert crowd[1].ids == alone
    assert crowd[2].ids != alone


def test_one_compiled_step_whatever_the_mix_of_requests(model):
    clear_compiled()
    engine = Engine(model, slots=3, max_len=64, prefill_chunk=16)
    for i, sampling in enumerate(MIXED):
        engine.submit(
            _prompt(5 + 2 * i, i),  # one prefill bucket (16)
            max_new_tokens=3 + i,
            sampling=sampling,
            seed=i,
            stop_ids=tuple(range(3, 3 + i)),
        )
        engine.step()
    engine.run_until_idle()
    counts = {name: engine.compiled_count(name) for name in ("step", "insert", "prefill")}
    assert counts == {"step": 1, "insert": 1, "prefill": 1}
    engine.generate([_prompt(40, 1)], max_new_tokens=4, sampling=SAMPLED, seed=3)  # 3 chunks of 16
    assert engine.compiled_count("step") == 1 and engine.compiled_count("insert") == 1
    assert engine.compiled_count("prefill") == 1


def test_budget_capped_by_the_cache(model, gen):
    engine = Engine(model, slots=2, max_len=24, prefill_chunk=16)
    p = _prompt(10)
    (r,) = engine.generate([p], max_new_tokens=40, stop_ids=())
    # The leading bucket shrinks to the prompt near the limit (10 slots), 14 free slots: 15 tokens.
    want = gen.generate([p], max_new_tokens=40, stop_ids=(), max_len=24)
    assert r.ids == want.ids[0] and len(r.ids) == 15
    assert r.stop_reason == want.stop_reasons[0] == "cache_full"


def test_callbacks_stream_every_id_in_order(model):
    engine = Engine(model, slots=2, max_len=64, prefill_chunk=16)
    seen, done = [], []
    reqs = [
        engine.submit(
            _prompt(n, n),
            max_new_tokens=6,
            stop_ids=(),
            on_token=lambda r, t: seen.append((r.id, t)),
            on_done=done.append,
        )
        for n in (4, 30, 12)
    ]
    engine.run_until_idle()
    for r in reqs:
        assert [t for i, t in seen if i == r.id] == r.ids
        assert len(r.token_times) == len(r.ids) == 6
    assert sorted(r.id for r in done) == [r.id for r in reqs]


def test_cancel_from_another_thread_while_running_forever(model):
    engine = Engine(model, slots=2, max_len=96, prefill_chunk=16)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        got_three = threading.Event()

        def on_token(r, t):
            if len(r.ids) == 3:
                got_three.set()

        long = engine.submit(_prompt(8), max_new_tokens=80, stop_ids=(), on_token=on_token)
        queued = [engine.submit(_prompt(8, i), max_new_tokens=80, stop_ids=()) for i in (1, 2)]
        assert got_three.wait(60)
        engine.cancel(long)
        engine.cancel(queued[1])  # still queued (2 slots): never starts
        assert long.wait(60) and queued[1].wait(60)
        assert long.stop_reason == "cancelled" and len(long.ids) < 80
        assert queued[1].stop_reason == "cancelled"
        assert queued[0].wait(120) and queued[0].stop_reason == "max_new_tokens"
    finally:
        stop.set()
        thread.join(10)


def test_bad_requests(model):
    engine = Engine(model, slots=1, max_len=32, prefill_chunk=16)
    with pytest.raises(PromptTooLongError):
        engine.submit(_prompt(33))
    with pytest.raises(GenerationError, match="empty"):
        engine.submit([])
    with pytest.raises(GenerationError, match="stop ids"):
        engine.submit([5], stop_ids=range(10, 11 + MAX_STOP_IDS))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        engine.submit([5], max_new_tokens=0)


@pytest.mark.parametrize(
    "spec, kv_cache",
    [("data=2,fsdp=2,tensor=2", None), ("data=1,fsdp=1,tensor=8", None), ("data=4,tensor=2", None)]
    + [("data=2,fsdp=2,tensor=2", "int8")],
)
def test_mesh_equals_one_device(spec, kv_cache):
    from glm4_jax.placement import shard_model
    from glm4_jax.sharding import make_mesh

    cfg = SHARDABLE.replace(max_seq_len=64)
    rng = np.random.RandomState(0)
    specs = [
        dict(prompt=_prompt(n, i, cfg.vocab_size), max_new_tokens=m, sampling=MIXED[i % 3], seed=i, stop_ids=())
        for i, (n, m) in enumerate([(5, 8), (20, 4), (11, 10), (3, 6), (30, 5)])
    ]
    order = rng.permutation(len(specs))

    def run(engine):
        reqs = {}
        for i in order:
            reqs[i] = engine.submit(**specs[i])
            engine.step()
        engine.run_until_idle()
        return [reqs[i].ids for i in range(len(specs))]

    one = run(Engine(sharpen(init_model(cfg, seed=2)), slots=4, max_len=64, prefill_chunk=16, kv_cache=kv_cache))
    mesh = make_mesh(spec)
    sharded = shard_model(sharpen(init_model(cfg, seed=2)), mesh)
    assert run(Engine(sharded, slots=4, max_len=64, prefill_chunk=16, mesh=mesh, kv_cache=kv_cache)) == one


def test_int8_kv_cache_ids_alone_in_a_batch_and_from_the_generator(model, gen):
    """With an int8 cache the engine copies the scales with k and v into the slot: a request's greedy ids are
    the same alone, in a running batch, and from the static Generator with an int8 cache."""
    import jax.numpy as jnp

    engine = Engine(model, slots=3, max_len=96, prefill_chunk=16, kv_cache="int8")
    cache = engine._state.cache
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == (*cache.k.shape[:-1], 1)
    gen8 = Generator(model, prefill_chunk=16, kv_cache="int8")
    specs = [(_prompt(n, 20 + n), m) for n, m in [(7, 12), (33, 6), (20, 10), (3, 9)]]
    alone = [engine.generate([p], max_new_tokens=m, stop_ids=())[0].ids for p, m in specs]
    for (p, m), ids in zip(specs, alone, strict=True):
        assert ids == gen8.generate([p], max_new_tokens=m, stop_ids=()).ids[0]
    reqs = []
    for p, m in specs:  # each joins while the ones before decode
        reqs.append(engine.submit(p, max_new_tokens=m, stop_ids=()))
        engine.step()
        engine.step()
    engine.run_until_idle()
    assert [r.ids for r in reqs] == alone
    # the int8 cache does change the ids of some request (the test sees the quantized path, not a bf16 one)
    bf16 = [gen.generate([p], max_new_tokens=m, stop_ids=()).ids[0] for p, m in specs]
    assert bf16 != alone
