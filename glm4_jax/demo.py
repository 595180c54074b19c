"""`python -m glm4_jax.demo`: the whole pipeline on a tiny random GLM-4, in seconds on a CPU.

1. Writes a small random GLM-4 checkpoint in the original THUDM layout (`model_type` "chatglm" config.json,
   safetensors shards with an index, fused QKV and gate/up tensors, `[out, in]` matrices) plus a small synthetic
   `tokenizer.model` (`glm4_jax.tokenizer.write_synthetic_tokenizer`);
2. converts it with the real converter (`python -m glm4_jax.convert SRC DST`, called in-process);
3. loads the converted checkpoint (`glm4_jax.api.GLM4Chat.from_checkpoint`) and generates from it: one chat turn
   and one raw completion, streamed as they are produced.

The weights are random, so the text is gibberish; what the demo shows is that every stage runs and fits together.
`--out DIR` keeps the checkpoints (DIR/thudm, DIR/converted) for notebooks; the default is a temporary directory,
removed at the end unless `--keep`.

The THUDM writer lives here (not in tests/) so that the installed package carries everything the demo needs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

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
    from glm4_jax.tokenizer import Tokenizer, write_synthetic_tokenizer

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


REAL_MODEL = """\
To run the real GLM-4-9B-chat (about 19 GB in bfloat16), download THUDM/glm-4-9b-chat and:
  python -m glm4_jax.convert /path/to/glm-4-9b-chat out/glm-4-9b-chat
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --chat "What is JAX?"
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat --mesh tensor=8 --chat "..."   # on 8 devices
  python -m glm4_jax.generate --ckpt out/glm-4-9b-chat                                  # interactive chat"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m glm4_jax.demo",
        description="Build a tiny random GLM-4 in the THUDM layout, convert it, and generate from it.",
    )
    p.add_argument("--out", metavar="DIR", help="keep the checkpoints in DIR (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (implied by --out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of sampling (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per generation (default 24)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")

    t0 = time.perf_counter()
    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="glm4-jax-demo-"))
    keep = bool(args.out) or args.keep
    try:
        src, dst = out / "thudm", out / "converted"
        print(f"[1/3] writing a tiny random GLM-4 (THUDM layout) and a synthetic tokenizer to {src}", flush=True)
        write_demo_source(src, seed=args.seed)
        print(f"[2/3] converting it with `python -m glm4_jax.convert {src} {dst}`", flush=True)
        convert_checkpoint(src, dst)
        from glm4_jax.api import GLM4Chat

        chat = GLM4Chat.from_checkpoint(dst)
        cfg = chat.cfg
        print(
            f"      {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} q / {cfg.num_kv_heads} kv heads,"
            f" {cfg.vocab_size} vocab rows ({chat.tokenizer.n_vocab} token ids), {cfg.dtype}"
        )
        print("[3/3] generating (random weights, so the text is gibberish)")
        question = "Hello, world! How are you today?"
        print(f"  chat  user> {question}\n  assistant> ", end="", flush=True)
        for piece in chat.chat(question, stream=True, max_new_tokens=args.max_new_tokens, seed=args.seed):
            print(piece, end="", flush=True)
        r = chat.last_result
        print(f"\n        [{len(r.ids[0])} tokens, stop: {r.stop_reasons[0]}, {r.decode_tok_s:.0f} tok/s]")
        prompt = "The quick brown fox"
        print(f"  raw prompt (greedy)> {prompt}", end="", flush=True)
        for piece in chat.stream(prompt, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        r = chat.last_result
        print(f"\n        [{len(r.ids[0])} tokens, stop: {r.stop_reasons[0]}, {r.decode_tok_s:.0f} tok/s]")
        print(f"done in {time.perf_counter() - t0:.1f} s.")
        if keep:
            print(f"The checkpoints are in {out}; try:\n  python -m glm4_jax.generate --ckpt {dst} --chat 'Hi there'")
        print(REAL_MODEL)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
