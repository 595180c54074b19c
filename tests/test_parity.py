"""Parity with transformers' GlmForCausalLM: a tiny random model, converted by the real converter, in float32.

Parameterized over query heads per kv head (1, 3 and 16), two head dims and RoPE bases 1e4 and 5e6, on a prompt of
320 tokens so that a mistake in the partial, interleaved RoPE cannot hide behind short-range attention.
"""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_hf import hf_logits, save_hf, tiny_hf_model  # noqa: E402

from glm4_jax import checkpoint  # noqa: E402
from glm4_jax.convert.pipeline import convert  # noqa: E402
from glm4_jax.engine import Generator  # noqa: E402
from glm4_jax.model import KVCache  # noqa: E402
from glm4_jax.sampling import SamplingParams  # noqa: E402
from glm4_jax.sharding import make_mesh  # noqa: E402

PROMPT_LEN = 320
NEW_TOKENS = 32

CASES = {
    # name: (query heads, kv heads, head dim, RoPE base)
    "mha-h16-theta1e4": (4, 4, 16, 1e4),
    "gqa3-h32-theta5e6": (6, 2, 32, 5e6),
    "gqa16-h16-theta5e6": (16, 1, 16, 5e6),
    "gqa16-h32-theta1e4": (16, 1, 32, 1e4),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    n, k, h, theta = CASES[request.param]
    hf = tiny_hf_model(seed=3, num_attention_heads=n, num_key_value_heads=k, head_dim=h, rope_theta=theta)
    root = tmp_path_factory.mktemp(request.param)
    src = save_hf(hf, root / "hf")
    dst = convert(str(src), str(root / "converted"), dtype="float32", progress=False)
    model = checkpoint.load(dst)
    assert model.cfg.num_kv_heads == k and model.cfg.rope_theta == theta and model.cfg.dtype == "float32"
    return hf, model, dst


def _prompt(vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (2, PROMPT_LEN))


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    tokens = _prompt(model.cfg.vocab_size)
    ref = hf_logits(hf, tokens)
    ours, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(PROMPT_LEN), tokens.shape))
    ours = np.asarray(ours)
    diff = np.abs(ours - ref).max()
    print(f"max |logits - transformers| = {diff:.3g} (logit scale {np.abs(ref).max():.3g})")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _hf_greedy(hf, tokens, pad_id):
    import torch

    hf.generation_config.eos_token_id = None  # generate all NEW_TOKENS, as our loops do
    ids = torch.as_tensor(tokens)
    # An explicit mask: without one transformers infers it from pad_token_id, and a random prompt may hold that id.
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return ref[0, PROMPT_LEN:].tolist()


def test_greedy_ids_match_transformers(pair):
    hf, model, _ = pair
    tokens = _prompt(model.cfg.vocab_size, seed=1)[:1]
    ref_new = _hf_greedy(hf, tokens, model.cfg.pad_token_id)

    cache = KVCache.init(model.cfg, batch=1, max_len=PROMPT_LEN + NEW_TOKENS)
    logits, cache = model(jnp.asarray(tokens), jnp.arange(PROMPT_LEN)[None], cache, logits="last")
    ours = []
    for t in range(NEW_TOKENS):
        nxt = int(jnp.argmax(logits[0, -1]))
        ours.append(nxt)
        logits, cache = model(jnp.asarray([[nxt]]), jnp.asarray([[PROMPT_LEN + t]]), cache)
    assert ours == ref_new


def test_greedy_ids_with_ring_attention_on_a_mesh_match_transformers(pair):
    """The checkpoint loaded onto sequence=4 x tensor=2 (ring prefill, sequence-sharded cache) through the
    Generator that `generate` uses: the same 32 greedy ids as transformers."""
    hf, model, dst = pair
    tokens = _prompt(model.cfg.vocab_size, seed=1)[:1]
    mesh = make_mesh("sequence=4,tensor=2")
    sharded = checkpoint.load(dst, mesh=mesh)
    gen = Generator(sharded, mesh=mesh, prefill_chunk=128)
    result = gen.generate(
        [tokens[0].tolist()], max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0.0), stop_ids=()
    )
    assert sharded.layers.qkv.get_value().sharding.spec[2] == "tensor"
    assert result.ids[0] == _hf_greedy(hf, tokens, model.cfg.pad_token_id)
