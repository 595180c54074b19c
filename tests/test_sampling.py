"""The sampling filters on a tiny vocabulary: exact sets kept, greedy, penalty, padded rows, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm4_jax.sampling import (
    CHAT_DEFAULTS,
    SamplingParams,
    apply_repetition_penalty,
    candidates,
    filter_logits,
    mask_vocab,
    sample,
)


def _kept(logits, params, **kw):
    """The set of ids a draw can pick, per row."""
    out = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), params, **kw))
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in out]


def _draws(logits, params, n=400, **kw):
    logits = jnp.asarray(logits, jnp.float32)
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.vmap(lambda k: sample(logits, k, params, **kw))(keys)  # [n, B]
    return [set(np.asarray(toks[:, b]).tolist()) for b in range(logits.shape[0])]


LOGITS = np.array([[0.5, 3.0, -1.0, 2.0, 1.0, -2.0, 2.5, 0.0]], np.float32)  # ranking: 1, 6, 3, 4, 7(0.0)... 0


def test_top_k_keeps_exactly_k():
    for k in (1, 3):
        params = SamplingParams(temperature=1.0, top_k=k)
        want = set(np.argsort(-LOGITS[0])[:k].tolist())
        assert _kept(LOGITS, params) == [want]
        assert _draws(LOGITS, params) == [want]


def test_top_k_ties_still_keep_exactly_k():
    logits = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]], np.float32)
    kept = _kept(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    assert len(kept) == 2
    assert kept == {1, 2}  # ties broken by lower id


def test_top_k_zero_or_larger_than_vocab_is_off():
    assert _kept(LOGITS, SamplingParams(temperature=1.0, top_k=0)) == [set(range(8))]
    assert _kept(LOGITS, SamplingParams(temperature=1.0, top_k=100)) == [set(range(8))]


def test_top_p_nucleus_boundary():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs).astype(np.float32)

    def kept(p):
        return _kept(logits, SamplingParams(temperature=1.0, top_p=p))[0]

    # The smallest set of most likely ids whose probability reaches p.
    assert kept(0.3) == {0}
    assert kept(0.5) == {0}  # 0.5 alone reaches 0.5
    assert kept(0.51) == {0, 1}
    assert kept(0.79) == {0, 1}
    assert kept(0.81) == {0, 1, 2}
    assert kept(0.96) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    assert _draws(logits, SamplingParams(temperature=1.0, top_p=0.79)) == [{0, 1}]


def test_top_p_uses_the_tempered_distribution_after_top_k():
    probs = np.array([[0.4, 0.3, 0.2, 0.1]])
    logits = np.log(probs).astype(np.float32)
    # top_k=2 renormalizes to 4/7, 3/7: top_p=0.5 keeps only id 0; top_p=0.6 keeps both.
    assert _kept(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5)) == [{0}]
    assert _kept(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6)) == [{0, 1}]
    # A high temperature flattens the distribution, so top_p=0.5 needs two ids.
    assert _kept(logits, SamplingParams(temperature=100.0, top_p=0.5)) == [{0, 1}]


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 33)).astype(np.float32)
    got = np.asarray(sample(jnp.asarray(logits), jax.random.key(1), SamplingParams(temperature=0.0)))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    # Greedy ignores top-k / top-p, and the key.
    got2 = sample(jnp.asarray(logits), jax.random.key(2), SamplingParams(temperature=0.0, top_k=3, top_p=0.1))
    np.testing.assert_array_equal(np.asarray(got2), logits.argmax(-1))


def test_low_temperature_approaches_argmax():
    params = SamplingParams(temperature=1e-3)
    assert _draws(LOGITS, params, n=100) == [{1}]


def test_repetition_penalty_common_definition():
    logits = jnp.array([[2.0, -2.0, 2.0, -2.0, 0.0]])
    seen = jnp.array([[True, True, False, False, True]])
    got = np.asarray(apply_repetition_penalty(logits, seen, 2.0))
    np.testing.assert_array_equal(got, [[1.0, -4.0, 2.0, -2.0, 0.0]])
    # With greedy decoding the penalty changes the choice: id 0 (seen) drops below id 2.
    logits = jnp.array([[3.0, 0.0, 2.0]])
    seen = jnp.array([[True, False, False]])
    assert int(sample(logits, jax.random.key(0), SamplingParams(repetition_penalty=2.0), seen=seen)[0]) == 2
    assert int(sample(logits, jax.random.key(0), SamplingParams(repetition_penalty=1.0))[0]) == 0


def test_repetition_penalty_needs_seen():
    with pytest.raises(ValueError, match="seen"):
        sample(jnp.zeros((1, 4)), jax.random.key(0), SamplingParams(repetition_penalty=1.2))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=2.0, top_k=50, top_p=0.99),
    ],
    ids=["greedy", "temperature", "top_k", "top_p", "all"],
)
def test_padded_rows_never_sampled(params):
    n_vocab = 6
    logits = np.zeros((2, 10), np.float32)
    logits[:, n_vocab:] = 50.0  # the padded rows are by far the most likely
    logits[1, 2] = 1.0
    draws = _draws(logits, params, n=200, n_vocab=n_vocab)
    for row in draws:
        assert row and max(row) < n_vocab
    assert all(max(s) < n_vocab for s in _kept(logits, params, n_vocab=n_vocab))
    masked = np.asarray(mask_vocab(jnp.asarray(logits), n_vocab))
    assert np.all(np.isneginf(masked[:, n_vocab:]))


def test_same_seed_same_ids_different_seed_different_ids():
    logits = jnp.zeros((4, 1000))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = sample(logits, jax.random.key(7), params)
    b = sample(logits, jax.random.key(7), params)
    c = sample(logits, jax.random.key(8), params)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_draw_frequencies_follow_the_filtered_distribution():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    params = SamplingParams(temperature=1.0, top_p=0.79)  # keeps 0.5, 0.3 -> 5/8, 3/8
    keys = jax.random.split(jax.random.key(3), 4000)
    toks = np.asarray(jax.vmap(lambda k: sample(logits, k, params))(keys))[:, 0]
    freq = np.bincount(toks, minlength=4) / len(toks)
    np.testing.assert_allclose(freq, [5 / 8, 3 / 8, 0, 0], atol=0.03, rtol=0)


def test_candidates_sorted_with_ids():
    vals, ids = candidates(jnp.asarray(LOGITS), SamplingParams(temperature=0.5, top_k=3))
    np.testing.assert_array_equal(np.asarray(ids), [[1, 6, 3]])
    np.testing.assert_allclose(np.asarray(vals), [[6.0, 5.0, 4.0]], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2**31), r"top_k must be in \[0, 2147483647\]"),  # the sampler holds an int32
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_invalid_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_params_hash_equal_when_equal():
    assert hash(SamplingParams(temperature=1, top_p=1)) == hash(SamplingParams(temperature=1.0, top_p=1.0))
    assert SamplingParams(temperature=0.8, top_p=0.8) == CHAT_DEFAULTS


@pytest.mark.parametrize("temperature", [float("inf"), 1e308, 1e-30, 1e-38, 1e-45, 5e-324, 1.0])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (40, 0.9), (8, 0.999)])
def test_padded_ids_never_sampled_at_any_temperature(temperature, top_k, top_p):
    # ids 5.. are padding rows with the largest logits; a NaN anywhere would let argmax pick one of them.
    logits = jnp.asarray([[1.0, -3.0, 2.0, 0.5, -1.0, 50.0, 60.0, 70.0], [-5.0, -6.0, -7.0, -8.0, -9.0, 9.0, 9.0, 9.0]])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(0), 64)
    toks = np.asarray(jax.vmap(lambda k: sample(logits, k, params, n_vocab=5))(keys))
    assert toks.max() < 5, (temperature, top_k, top_p, toks.max())
    vals = np.asarray(filter_logits(logits, params, n_vocab=5))
    assert not np.isnan(vals).any() and np.isneginf(vals[:, 5:]).all()
    if temperature < 1e-20:  # a near-zero temperature is greedy
        assert set(toks[:, 0].tolist()) == {2} and set(toks[:, 1].tolist()) == {0}
