"""Model equivalences that need no torch: cached decode vs full forward, padded batches, full-size shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import sharpen

from glm4_jax.config import Config, ConfigError, preset
from glm4_jax.fixtures import GQA6
from glm4_jax.model import KVCache, abstract_model, init_model, param_axes, param_count

TINY = GQA6


def _ids(batch, length, seed=0, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def tiny_model():
    # std 0.02 leaves logits nearly flat; larger weights make every position matter in the comparisons.
    return sharpen(init_model(TINY, seed=1), 10.0)


def test_cached_decode_equals_full_forward(tiny_model):
    T, prefill = 40, 25
    ids = _ids(2, T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    full, _ = tiny_model(ids, pos)

    cache = KVCache.init(TINY, batch=2, max_len=64)
    first, cache = tiny_model(ids[:, :prefill], pos[:, :prefill], cache)
    steps = [first]
    for t in range(prefill, T):
        logits, cache = tiny_model(ids[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    diff = float(jnp.max(jnp.abs(cached - full)))
    print(f"max |cached - full| = {diff:.3g}")
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-4, rtol=1e-5)
    assert int(cache.end) == T
    assert np.array_equal(np.asarray(cache.pos[:, :T]), np.asarray(pos))
    assert np.all(np.asarray(cache.pos[:, T:]) == -1)


def test_left_padded_batch_equals_each_sequence_alone(tiny_model):
    lengths = [37, 20, 5]
    T = max(lengths)
    seqs = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    tokens = jnp.stack([jnp.pad(s, (T - len(s), 0), constant_values=TINY.pad_token_id) for s in seqs])
    positions = jnp.stack([jnp.arange(T) - (T - len(s)) for s in seqs])
    positions = jnp.where(positions < 0, -1, positions)

    batch_logits, _ = tiny_model(tokens, positions)
    # Then three decode steps on top of a cache holding the padded batch.
    cache = KVCache.init(TINY, batch=3, max_len=T + 3)
    _, cache = tiny_model(tokens, positions, cache)
    nxt = _ids(3, 3, seed=9)
    batch_steps = []
    for j in range(3):
        step_pos = jnp.asarray([[n + j] for n in lengths])
        logits, cache = tiny_model(nxt[:, j : j + 1], step_pos, cache)
        batch_steps.append(logits[:, 0])

    for b, s in enumerate(seqs):
        n = len(s)
        alone, _ = tiny_model(s[None], jnp.arange(n)[None])
        np.testing.assert_allclose(np.asarray(batch_logits[b, T - n :]), np.asarray(alone[0]), atol=1e-4, rtol=1e-5)
        ext = jnp.concatenate([s, nxt[b]])[None]
        alone_ext, _ = tiny_model(ext, jnp.arange(n + 3)[None])
        for j in range(3):
            np.testing.assert_allclose(
                np.asarray(batch_steps[j][b]), np.asarray(alone_ext[0, n + j]), atol=1e-4, rtol=1e-5
            )


def test_last_logits_only(tiny_model):
    ids = _ids(2, 17)
    pos = jnp.broadcast_to(jnp.arange(17), (2, 17))
    full, _ = tiny_model(ids, pos)
    last, _ = tiny_model(ids, pos, logits="last")
    assert last.shape == (2, 1, TINY.vocab_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-5, rtol=1e-6)


def test_full_size_parameter_count_without_allocating():
    before = len(jax.live_arrays())
    chat = abstract_model(preset("glm-4-9b-chat"))
    assert param_count(chat) == 9_399_951_360
    assert len(jax.live_arrays()) == before  # eval_shape allocated nothing
    assert chat.layers.qkv.get_value().dtype == jnp.bfloat16
    # The 1M model differs only by its 2 extra kv heads: 2 * (K + V) * 128 * (4096 + 1) * 40 more parameters.
    assert param_count(abstract_model(preset("glm-4-9b-chat-1m"))) == 9_399_951_360 + 2 * 2 * 128 * 4097 * 40


def test_every_parameter_has_axes_of_its_rank():
    from flax import nnx

    model = abstract_model(TINY)
    axes = param_axes(model)
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    assert len(flat_shapes) == 10  # embed, final_norm, lm_head and 7 stacked layer tensors (q/k/v, gate/up fused)
    for path, leaf in flat_shapes:
        node = axes
        for key in path:
            node = node[key.key]
        assert len(node) == len(leaf.shape), (path, node, leaf.shape)
    # 6 query heads over 2 kv heads: 2 kv groups of 3 query heads, a k and a v
    assert model.layers.qkv.get_value().shape == (3, 48, 2, 5, 16)
    assert axes["layers"]["qkv"] == ("layers", "embed", "kv_groups", None, "head_dim")
    assert axes["layers"]["gate_up"] == ("layers", "embed", None, "ffn")


CHATGLM = {
    "model_type": "chatglm",
    "num_layers": 40,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "num_attention_heads": 32,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "kv_channels": 128,
    "padded_vocab_size": 151552,
    "seq_length": 131072,
    "rope_ratio": 500,
    "layernorm_epsilon": 1.5625e-07,
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
}

HF_OLD = {
    "model_type": "glm",
    "num_hidden_layers": 40,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 151552,
    "max_position_embeddings": 131072,
    "rope_theta": 5000000.0,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1.5625e-07,
    "attention_bias": True,
    "hidden_act": "silu",
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
}

HF_NEW = {k: v for k, v in HF_OLD.items() if k not in ("rope_theta", "partial_rotary_factor")}
HF_NEW["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5}


@pytest.mark.parametrize("layout", [CHATGLM, HF_OLD, HF_NEW], ids=["chatglm", "glm-toplevel-rope", "glm-rope-params"])
def test_config_layouts_give_the_chat_preset(layout, tmp_path):
    cfg = Config.from_dict(layout)
    assert cfg == preset("glm-4-9b-chat")
    path = tmp_path / "config.json"
    cfg.save(path)
    assert Config.from_file(path) == cfg


def test_rope_ratio_and_kv_heads_come_from_the_config():
    cfg = Config.from_dict({**CHATGLM, "rope_ratio": 10000, "multi_query_group_num": 4, "seq_length": 1048576})
    assert cfg.rope_theta == 1e8 and cfg.num_kv_heads == 4 and cfg.max_seq_len == 1048576
    assert Config.from_dict({k: v for k, v in CHATGLM.items() if k != "rope_ratio"}).rope_theta == 10000.0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"]}, "not supported"),
        ({**HF_NEW, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"model_type": "llama"}, "unknown model_type"),
        ({**CHATGLM, "tie_word_embeddings": True}, "tied"),
        ({k: v for k, v in CHATGLM.items() if k != "num_layers"}, "num_layers"),
        ({**HF_NEW, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "yarn"),
        ({**HF_OLD, "num_key_value_heads": 5}, "multiple"),
        ({**HF_OLD, "vocab_size": 1000}, "must lie in the vocabulary"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(bad, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(bad)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        Config.from_file(tmp_path / "config.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        Config.from_file(broken)
