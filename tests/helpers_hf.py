"""Tiny random GLM-4 models in transformers, and their weights written in every layout the converter reads.

    model = tiny_hf_model(seed=0)                       # GlmForCausalLM, float32, every weight random
    model = tiny_hf_model(seed=0, glm4=True)            # Glm4ForCausalLM (GLM-4-0414: two more norms a layer)
    save_hf(model, tmp / "hf")                          # transformers layout (save_pretrained)
    save_hf(model, tmp / "hf-sharded", max_shard_size="60KB")   # several shards + model.safetensors.index.json
    save_thudm(model, tmp / "thudm", shards=3)          # original THUDM layout (fused QKV, transformer.* names)
    save_thudm(model, tmp / "bin", shards=2, fmt="bin") # the same as legacy pytorch_model-*.bin shards
    logits = hf_logits(model, tokens)                   # [B, T, V] float32 numpy, the reference

The THUDM layout is produced from the transformers weights: `query_key_value` = [all Q | all K | all V] rows
(weights and biases), `dense_h_to_4h` = the fused [gate | up] rows, a `chatglm` config.json whose rope_ratio gives
the same RoPE base (10000 * rope_ratio = rope_theta), and the `rotary_pos_emb.inv_freq` buffer the converter drops.
Needs torch and transformers (the [test] extra).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

# No square matrix anywhere (hidden 80, q width 4*16 = 64, kv width 2*16 = 32, ffn 112, vocab 300), so a
# missing or extra transpose cannot go unnoticed.
TINY = dict(
    vocab_size=300,
    hidden_size=80,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    partial_rotary_factor=0.5,
    attention_bias=True,
    tie_word_embeddings=False,
    pad_token_id=2,  # not 0: config.py reads a chatglm pad_token_id of 0 as missing
    eos_token_id=[1, 2],
    bos_token_id=None,
)


def tiny_hf_config(glm4: bool = False, **overrides) -> GlmConfig:
    """A GlmConfig (a Glm4Config with `glm4`) with the TINY sizes; keyword arguments override them (e.g.
    num_key_value_heads=1, or rope_parameters={...} for YaRN)."""
    kw = {**TINY, **overrides}
    if "rope_parameters" in kw:  # the RoPE settings all in one place, as transformers 5 writes them
        kw["rope_parameters"] = {
            "rope_theta": kw.pop("rope_theta"),
            "partial_rotary_factor": kw.pop("partial_rotary_factor"),
            **kw["rope_parameters"],
        }
    return (Glm4Config if glm4 else GlmConfig)(**kw)


def tiny_hf_model(seed: int = 0, glm4: bool = False, **overrides) -> GlmForCausalLM:
    """A float32 GlmForCausalLM (Glm4ForCausalLM with `glm4`) in eval mode whose every parameter is random: weights
    N(0, 0.05) (larger than the usual init so the layers matter), biases N(0, 0.1), norm weights 1 + N(0, 0.1)."""
    torch.manual_seed(seed)
    model_class = Glm4ForCausalLM if glm4 else GlmForCausalLM
    model = model_class(tiny_hf_config(glm4, **overrides)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def hf_logits(model: GlmForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] (float32 numpy) of `model` on `tokens` [B, T], positions 0..T-1."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def save_hf(model: GlmForCausalLM, directory, *, max_shard_size=None, fmt: str = "safetensors") -> pathlib.Path:
    """The transformers layout: `save_pretrained` for safetensors; `pytorch_model*.bin` written here for fmt="bin"
    (transformers 5 no longer writes them). Returns the directory."""
    directory = pathlib.Path(directory)
    if fmt == "safetensors":
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(directory, **kw)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(directory / "config.json")
        write_shards(dict(model.state_dict()), directory, 1, fmt)
    return directory


def thudm_config(config: GlmConfig) -> dict:
    """The chatglm config.json matching a GlmConfig (rope_ratio = rope_theta / 10000)."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    eos = config.eos_token_id
    return {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": bool(config.attention_bias),
        "apply_residual_connection_post_layernorm": False,
        "ffn_hidden_size": config.intermediate_size,
        "hidden_size": config.hidden_size,
        "kv_channels": config.head_dim,
        "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": True,
        "multi_query_group_num": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": theta / 10000.0,
        "seq_length": config.max_position_embeddings,
        "eos_token_id": list(eos) if isinstance(eos, (list, tuple)) else eos,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def thudm_state_dict(model: GlmForCausalLM) -> dict[str, torch.Tensor]:
    """The weights of `model` under the THUDM names, fused as the original checkpoints are."""
    sd, cfg = model.state_dict(), model.config
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"]}
    rot = int(cfg.head_dim * 0.5)  # THUDM rotates half of each head: inv_freq has rot / 2 entries
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000.0 ** (torch.arange(0, rot, 2).float() / rot))
    for i in range(cfg.num_hidden_layers):
        h, t = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out[t + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[t + "self_attention.query_key_value.weight"] = torch.cat(
            [sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0
        )
        if cfg.attention_bias:
            out[t + "self_attention.query_key_value.bias"] = torch.cat(
                [sd[h + f"self_attn.{x}_proj.bias"] for x in "qkv"], dim=0
            )
        out[t + "self_attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[t + "post_attention_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[t + "mlp.dense_h_to_4h.weight"] = sd[h + "mlp.gate_up_proj.weight"]  # already [gate | up]
        out[t + "mlp.dense_4h_to_h.weight"] = sd[h + "mlp.down_proj.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_thudm(
    model: GlmForCausalLM, directory, *, shards: int = 1, fmt: str = "safetensors", dtype=None
) -> pathlib.Path:
    """The original THUDM layout, as `shards` files of `fmt` ("safetensors" or "bin") with an index when
    sharded, optionally cast to `dtype` (a torch dtype). Returns the directory."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(thudm_config(model.config), indent=2))
    sd = thudm_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    write_shards(sd, directory, shards, fmt)
    return directory


def write_shards(sd: dict[str, torch.Tensor], directory, shards: int = 1, fmt: str = "safetensors") -> None:
    """Splits `sd` (in order) into `shards` files named as transformers names them, plus the index JSON."""
    from safetensors.torch import save_file

    names = list(sd)
    groups = [g for g in np.array_split(np.arange(len(names)), shards) if len(g)]
    stem, ext, index_name = (
        ("model", "safetensors", "model.safetensors.index.json")
        if fmt == "safetensors"
        else ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    )
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{n:05d}-of-{len(groups):05d}.{ext}"
        part = {names[j]: sd[names[j]] for j in group}
        if fmt == "safetensors":
            save_file(part, str(directory / fname), metadata={"format": "pt"})
        else:
            torch.save(part, directory / fname)
        weight_map.update(dict.fromkeys(part, fname))
    if len(groups) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / index_name).write_text(json.dumps(index, indent=2))


def write_tokenizer_json(rank_file, directory, *, chat_template: str | None = None, jinja_file: bool = False):
    """A Hugging Face tokenizer directory made from a tiktoken `tokenizer.model` by transformers' own converter
    (`TikTokenConverter`, GLM-4's split pattern, the 14 special tokens after the ranks): tokenizer.json, and a
    tokenizer_config.json with the eos token and, when given, the chat template (in chat_template.jinja with
    `jinja_file`). Returns the directory."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from glm4_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    converter = TikTokenConverter(vocab_file=str(rank_file), pattern=SPLIT_PATTERN, extra_special_tokens=SPECIAL_TOKENS)
    converter.converted().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None and jinja_file:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return directory
