"""GLM-4-0414 (transformers Glm4ForCausalLM, model_type "glm4") and YaRN RoPE scaling: parity with transformers.

A tiny random Glm4ForCausalLM saved by transformers, converted by the real converter, in float32, on prompts of
320 tokens: logits within 1e-4 and the same 32 greedy ids, for kv heads 1, 2 and = heads. The same with YaRN
(factor 4 from an original context of 128, so every prompt runs far beyond it), for Glm4ForCausalLM and for the
GLM-4-9B GlmForCausalLM.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_hf import hf_logits, save_hf, tiny_hf_model  # noqa: E402

from glm4_jax import checkpoint  # noqa: E402
from glm4_jax.config import Config  # noqa: E402
from glm4_jax.convert.pipeline import convert  # noqa: E402
from glm4_jax.model import KVCache  # noqa: E402

PROMPT_LEN = 320
NEW_TOKENS = 32
ORIGINAL = 128  # the YaRN cases' original context: prompts run to 2.75x beyond it
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}

CASES = {
    # name: (Glm4ForCausalLM?, query heads, kv heads, head dim, attention bias, RoPE parameters)
    "glm4-mha-h16": (True, 4, 4, 16, True, None),
    "glm4-gqa2-h32-nobias": (True, 4, 2, 32, False, None),
    "glm4-gqa8-h16": (True, 8, 1, 16, True, None),
    "glm4-yarn-gqa3-h32": (True, 6, 2, 32, False, YARN),
    "glm-yarn-gqa2-h16": (False, 4, 2, 16, True, {**YARN, "beta_fast": 16, "attention_factor": 1.25}),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    glm4, n, k, h, bias, rope = CASES[request.param]
    kw = {} if rope is None else {"rope_parameters": rope, "max_position_embeddings": ORIGINAL}
    hf = tiny_hf_model(
        seed=5, glm4=glm4, num_attention_heads=n, num_key_value_heads=k, head_dim=h, attention_bias=bias, **kw
    )
    root = tmp_path_factory.mktemp(request.param)
    src = save_hf(hf, root / "hf")
    saved = json.loads((src / "config.json").read_text())
    assert saved["model_type"] == ("glm4" if glm4 else "glm")
    dst = convert(str(src), str(root / "converted"), dtype="float32", progress=False)
    model = checkpoint.load(dst)
    cfg = model.cfg
    assert (cfg.post_norms, cfg.num_kv_heads, cfg.attention_bias, cfg.dtype) == (glm4, k, bias, "float32")
    assert cfg.rope_type == ("default" if rope is None else "yarn")
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
    if model.cfg.rope_type == "yarn":  # and the scaling matters: plain RoPE is far off
        cfg = model.cfg
        model.cfg = cfg.replace(rope_type="default")
        try:
            plain, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(PROMPT_LEN), tokens.shape))
        finally:
            model.cfg = cfg
        assert np.abs(np.asarray(plain) - ref).max() > 1e-2


def _hf_greedy(hf, tokens, pad_id):
    import torch

    hf.generation_config.eos_token_id = None  # all NEW_TOKENS, as our loops
    ids = torch.as_tensor(tokens)
    with torch.no_grad():  # an explicit mask: generate would otherwise mask the prompt's pad ids (2) out
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id
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


@pytest.mark.parametrize("pair", ["glm4-gqa2-h32-nobias", "glm4-yarn-gqa3-h32"], indirect=True)
def test_greedy_ids_on_a_mesh_match_transformers(pair):
    """The checkpoint loaded onto sequence=4 x tensor=2 (ring prefill, sequence-sharded cache) through the
    Generator that `generate` uses, for the GLM-4-0414 cases with and without YaRN."""
    from glm4_jax.engine import Generator
    from glm4_jax.sampling import SamplingParams
    from glm4_jax.sharding import make_mesh

    hf, model, dst = pair
    tokens = _prompt(model.cfg.vocab_size, seed=1)[:1]
    mesh = make_mesh("sequence=4,tensor=2")
    sharded = checkpoint.load(dst, mesh=mesh)
    gen = Generator(sharded, mesh=mesh, prefill_chunk=128)
    result = gen.generate(
        [tokens[0].tolist()], max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0.0), stop_ids=()
    )
    assert result.ids[0] == _hf_greedy(hf, tokens, model.cfg.pad_token_id)


def test_post_norms_are_parameters_only_of_glm4():
    plain = Config.from_dict(json.loads(tiny_hf_model(0).config.to_json_string()))
    glm4 = Config.from_dict(json.loads(tiny_hf_model(0, glm4=True).config.to_json_string()))
    extra = set(glm4.param_layout()) - set(plain.param_layout())
    assert extra == {"layers/post_attn_norm", "layers/post_mlp_norm"}
    assert glm4.param_layout()["layers/post_mlp_norm"] == ((3, 80), ("layers", "norm"))
    assert not plain.post_norms and glm4.post_norms


# The config.json of GLM-4-32B-0414 as published (recalled, not read from the hub here; see Config.glm_4_32b_0414).
GLM4_32B_0414 = {
    "architectures": ["Glm4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "initializer_range": 0.02,
    "intermediate_size": 23040,
    "max_position_embeddings": 32768,
    "model_type": "glm4",
    "num_attention_heads": 48,
    "num_hidden_layers": 61,
    "num_key_value_heads": 2,
    "pad_token_id": 151329,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 151552,
}


def test_a_0414_config_json_gives_its_preset(tmp_path):
    from glm4_jax.config import preset

    cfg = Config.from_dict(GLM4_32B_0414)
    assert cfg == preset("glm-4-32b-0414")
    assert cfg.post_norms and not cfg.attention_bias and cfg.rms_norm_eps == 1e-5 and cfg.max_seq_len == 32768
    cfg.save(tmp_path / "config.json")
    assert Config.from_file(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_yarn_from_the_config_as_thudm_recommends_it(key, tmp_path):
    """THUDM's recipe (factor 4 from 32K) in the legacy `rope_scaling` or the transformers 5 `rope_parameters`."""
    import math

    from glm4_jax.config import preset

    rope = {"type" if key == "rope_scaling" else "rope_type": "yarn", "factor": 4.0}
    if key == "rope_scaling":
        rope["original_max_position_embeddings"] = 32768
    cfg = Config.from_dict({**GLM4_32B_0414, key: rope})
    assert cfg == preset("glm-4-32b-0414").with_yarn(4.0)
    assert cfg.rope_type == "yarn" and cfg.yarn_original_max_seq_len == 32768 and cfg.max_seq_len == 131072
    assert cfg.yarn_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cfg.save(tmp_path / "config.json")
    assert Config.from_file(tmp_path / "config.json") == cfg


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 16,
            "truncate": False,
        },
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 4096,
            "mscale": 2,
            "mscale_all_dim": 1,
        },
    ],
)
def test_yarn_frequencies_and_attention_factor_equal_transformers(rope):
    """Full-size head (128 dims, 64 rotated): our frequencies and factor against transformers' own YaRN init."""
    from transformers import Glm4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from glm4_jax.model import yarn_inv_freq

    hf = Glm4Config(
        max_position_embeddings=32768, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, **rope}
    )
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = Config.from_dict(json.loads(hf.to_json_string()))
    assert cfg.yarn_attention_factor == pytest.approx(ref_factor, rel=1e-12)
    np.testing.assert_allclose(yarn_inv_freq(cfg), ref_freq.numpy(), rtol=1e-6, atol=0)


def test_generate_chat_on_a_converted_tiny_0414_checkpoint(tmp_path):
    """A tiny Glm4ForCausalLM with a tokenizer.json (and no tokenizer.model) and the GLM-4-0414 chat template,
    converted by the real converter; `python -m glm4_jax.generate --chat` in a subprocess gives the chat template's
    prompt (the JsonTokenizer's) and the greedy ids of transformers on that prompt, up to its first stop id."""
    import os
    import subprocess
    import sys

    import torch
    from conftest import REPO
    from helpers_hf import write_tokenizer_json
    from test_chat0414 import GLM4_0414_TEMPLATE

    from glm4_jax.api import GLM4Chat
    from glm4_jax.fixtures import write_synthetic_tokenizer
    from glm4_jax.tokenizer_json import JsonTokenizer

    # 256 byte ranks + the 14 specials at 256..269 (<|endoftext|> 256, <|user|> 263, <|observation|> 265)
    rank_file = write_synthetic_tokenizer(tmp_path / "tokenizer.model", n_merges=0)
    hf = tiny_hf_model(seed=7, glm4=True, eos_token_id=[256, 263, 265], pad_token_id=256)
    src = save_hf(hf, tmp_path / "hf")
    write_tokenizer_json(rank_file, src, chat_template=GLM4_0414_TEMPLATE)
    dst = convert(str(src), str(tmp_path / "converted"), dtype="float32", progress=False)
    assert (dst / "tokenizer.json").is_file() and not (dst / "tokenizer.model").exists()

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    args = ["--ckpt", str(dst), "--chat", "Hello there", "--system", "Be brief.", "--temperature", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "glm4_jax.generate", *args, "--max-new-tokens", "12", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[-1])
    print("generated", record["ids"], record["stop_reason"])

    chat = GLM4Chat.from_checkpoint(dst)
    assert isinstance(chat.tokenizer, JsonTokenizer) and chat.tokenizer.chat_format == "glm-4-0414"
    ids = chat.encode_chat("Hello there", system="Be brief.")
    assert chat.tokenizer.render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ) == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHello there<|assistant|>")
    assert record["prompt_tokens"] == len(ids)

    hf.generation_config.eos_token_id = None
    prompt = torch.as_tensor([ids])
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    ref = ref[0, len(ids) :].tolist()
    stops = set(chat.chat_stop_ids())
    assert stops == {256, 263, 265}
    first_stop = next((i for i, t in enumerate(ref) if t in stops), None)
    assert record["ids"] == (ref if first_stop is None else ref[: first_stop + 1])
    body = [t for t in record["ids"] if t not in stops]
    assert record["text"] == chat.tokenizer.decode(body).removeprefix("\n")
