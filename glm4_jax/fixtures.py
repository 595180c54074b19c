"""Fixtures for the demo, the tests, the benchmarks and the notebooks: tiny configs, a synthetic tokenizer, and a
random GLM-4 checkpoint in the original THUDM layout, converted with the real converter.

    from glm4_jax.fixtures import build_demo_checkpoint, TINY
    ckpt = build_demo_checkpoint("/tmp/demo")   # /tmp/demo/thudm (source) -> /tmp/demo/converted

They live in the package (not in tests/) so that the installed package carries everything the demo needs.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import pathlib
import re
import shutil

import numpy as np

from glm4_jax.config import Config

# ---- tiny configs ------------------------------------------------------------------------------------------------

# The benchmarks' and `python -m glm4_jax.bench --random tiny`'s model (bfloat16).
TINY = Config(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_seq_len=4096,
    eos_token_ids=(1,),
    pad_token_id=0,
)

# Head counts, ffn and vocab divide 8; 2 kv heads, so tensor=8 replicates them. float32 for exact comparisons
# (the sharding, ring-attention and multi-process tests).
SHARDABLE = Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    max_seq_len=64,
    eos_token_ids=(1,),
    pad_token_id=0,
    dtype="float32",
)

# A small GQA model (6 query heads on 2 kv heads, no dim divides another), float32: the model and generation tests.
GQA6 = Config(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_seq_len=512,
    eos_token_ids=(1, 2),
    pad_token_id=0,
    dtype="float32",
)

# Every layer matrix 256 x 256 (much larger than a short KV cache), bfloat16: the compiled-HLO checks of a quantized
# decode step.
WIDE = Config(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=64,
    max_seq_len=64,
    eos_token_ids=(1,),
    pad_token_id=0,
)


def hf_glm_kwargs(cfg: Config) -> dict:
    """The keyword arguments of a transformers `GlmConfig` with the same model as `cfg`."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        partial_rotary_factor=cfg.partial_rotary_factor,
        rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=cfg.attention_bias,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=list(cfg.eos_token_ids),
    )


# ---- a synthetic tokenizer ---------------------------------------------------------------------------------------

# A fixed text for `write_synthetic_tokenizer` to learn merges from (our own sentences, English and Chinese).
SYNTHETIC_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model reads the text one token at a time, and the tokenizer
turns the text into tokens. The model is written in JAX, the weights are sharded over the devices, and the cache
holds the keys and values of the tokens that came before. Hello, world! How are you today? I am fine, thank you.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 2))
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159
你好！今天天气很好。我们一起去公园散步吧。
这是一个小小的语言模型，它一次读一个词，然后写出下一个词。
模型的权重分布在多个设备上，缓存保存之前每个词的键和值。
人工智能助手可以回答问题，也可以调用工具。请问北京今天的天气怎么样？
北京今天晴，气温二十度，适合出门。谢谢你的帮助！不客气。
"""

_SYNTHETIC_WORD_RE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+")


def _learn_merges(corpus: str, n_merges: int) -> list[bytes]:
    """Greedy byte-pair merges: each step joins the most frequent adjacent pair (ties: the smallest ids)."""
    vocab = [bytes([b]) for b in range(256)]
    index = {token: i for i, token in enumerate(vocab)}
    words = collections.Counter(tuple(word.encode("utf-8")) for word in _SYNTHETIC_WORD_RE.findall(corpus))
    while len(vocab) < 256 + n_merges:
        pairs: collections.Counter[tuple[int, int]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the corpus supports only {len(vocab) - 256} merges, not {n_merges}")
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[a] + vocab[b]
        if merged not in index:  # the same bytes can be reached by two merge orders: keep one rank
            index[merged] = len(vocab)
            vocab.append(merged)
        words = _merge_pair(words, (a, b), index[merged])
    return vocab


def _merge_pair(
    words: collections.Counter[tuple[int, ...]], pair: tuple[int, int], new_id: int
) -> collections.Counter[tuple[int, ...]]:
    merged: collections.Counter[tuple[int, ...]] = collections.Counter()
    for word, count in words.items():
        out: list[int] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(word[i])
                i += 1
        merged[tuple(out)] += count
    return merged


def write_synthetic_tokenizer(path: os.PathLike | str, n_merges: int = 256) -> pathlib.Path:
    """Write a small deterministic `tokenizer.model`, for the demo and tests.

    Ranks 0..255 are the single bytes (rank = byte value); ranks 256..255+n_merges are merges learned greedily from
    `SYNTHETIC_CORPUS`. `Tokenizer.from_file` then puts the 14 special tokens at 256+n_merges.. and any text still
    encodes (byte fallback). The same `n_merges` always writes the same bytes.
    """
    if n_merges < 0:
        raise ValueError(f"n_merges must be >= 0, got {n_merges}")
    path = pathlib.Path(path)
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}\n"
        for rank, token in enumerate(_learn_merges(SYNTHETIC_CORPUS, n_merges))
    ]
    path.write_text("".join(lines), encoding="ascii")
    return path


# ---- a random THUDM-layout checkpoint -------------------------------------------------------------------------

# A tiny GLM-4: the real model's layout (grouped kv heads, partial RoPE, QKV bias, untied output layer) at toy size.
DEMO_DIMS = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    multi_query_group_num=2,
    kv_channels=16,
    ffn_hidden_size=128,
    seq_length=1024,
    rope_ratio=500,
)


def thudm_config(n_vocab_rows: int, eos_token_id, pad_token_id: int, dtype: str = "bfloat16", **dims) -> dict:
    """A THUDM (`model_type` "chatglm") config.json dict; `dims` override DEMO_DIMS."""
    d = {**DEMO_DIMS, **dims}
    return {
        "_name_or_path": "glm4-jax-demo",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "eos_token_id": list(eos_token_id),
        "ffn_hidden_size": d["ffn_hidden_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": d["hidden_size"],
        "kv_channels": d["kv_channels"],
        "layernorm_epsilon": 1.5625e-07,
        "multi_query_attention": True,
        "multi_query_group_num": d["multi_query_group_num"],
        "num_attention_heads": d["num_attention_heads"],
        "num_layers": d["num_layers"],
        "original_rope": True,
        "pad_token_id": pad_token_id,
        "padded_vocab_size": n_vocab_rows,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": d["rope_ratio"],
        "seq_length": d["seq_length"],
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def thudm_tensors(config: dict, seed: int = 0, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Random weights with THUDM names and shapes (torch `nn.Linear` weights are [out, in])."""
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    D, V, F = config["hidden_size"], config["padded_vocab_size"], config["ffn_hidden_size"]
    N, K, H = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    qkv = N * H + 2 * K * H  # fused [all Q | all K | all V]

    def normal(*shape, std=0.02):
        return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)

    def norm(n):  # around 1, not exactly 1, so a misplaced norm weight would show
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np_dtype)

    t = {"transformer.embedding.word_embeddings.weight": normal(V, D, std=1.0)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(D)
        t[p + "self_attention.query_key_value.weight"] = normal(qkv, D, std=0.2)
        t[p + "self_attention.query_key_value.bias"] = normal(qkv, std=0.2)
        t[p + "self_attention.dense.weight"] = normal(D, N * H, std=0.2)
        t[p + "post_attention_layernorm.weight"] = norm(D)
        t[p + "mlp.dense_h_to_4h.weight"] = normal(2 * F, D, std=0.2)  # [gate | up]
        t[p + "mlp.dense_4h_to_h.weight"] = normal(D, F, std=0.2)
    t["transformer.encoder.final_layernorm.weight"] = norm(D)
    t["transformer.output_layer.weight"] = normal(V, D, std=0.2)
    rot = H // 2  # a buffer the real checkpoints carry; converters drop it
    t["transformer.rotary_pos_emb.inv_freq"] = (
        1.0 / (10000.0 * config["rope_ratio"]) ** (np.arange(0, rot, 2, dtype=np.float32) / rot)
    ).astype(np_dtype)
    return t


def write_thudm_checkpoint(
    directory: str | pathlib.Path, config: dict, *, seed: int = 0, shards: int = 2
) -> pathlib.Path:
    """Writes config.json, `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = thudm_tensors(config, seed, config.get("torch_dtype", "bfloat16"))
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(a.nbytes for a in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return directory


def write_demo_source(src: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Writes the tiny random GLM-4 in the THUDM layout, with a synthetic tokenizer.model, to `src` (replaced)."""
    from glm4_jax.tokenizer import Tokenizer

    src = pathlib.Path(src)
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    write_synthetic_tokenizer(src / "tokenizer.model")
    tok = Tokenizer.from_file(src / "tokenizer.model")
    rows = -(-(tok.n_vocab + 1) // 128) * 128  # padded like GLM-4: rows past n_vocab that no id maps to
    config = thudm_config(rows, eos_token_id=tok.stop_ids, pad_token_id=tok.eos_id)
    return write_thudm_checkpoint(src, config, seed=seed)


def convert_checkpoint(src: str | pathlib.Path, dst: str | pathlib.Path, dtype: str | None = None) -> pathlib.Path:
    """`python -m glm4_jax.convert SRC DST --force -q [--dtype DTYPE]`, in-process."""
    from glm4_jax.convert.__main__ import main as convert_main

    argv = [str(src), str(dst), "--force", "-q"] + (["--dtype", dtype] if dtype else [])
    rc = convert_main(argv)
    if rc:
        raise SystemExit(rc)
    return pathlib.Path(dst)


def build_demo_checkpoint(out: str | pathlib.Path, *, seed: int = 0, dtype: str | None = None) -> pathlib.Path:
    """Writes OUT/thudm (THUDM layout + synthetic tokenizer) and converts it to OUT/converted; returns the latter."""
    out = pathlib.Path(out)
    write_demo_source(out / "thudm", seed=seed)
    return convert_checkpoint(out / "thudm", out / "converted", dtype)
