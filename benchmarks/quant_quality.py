"""Quality of quantized weights against float32 transformers: next-token KL and top-1 agreement.

    python benchmarks/quant_quality.py                 # a small random GLM-4 (seconds)
    python benchmarks/quant_quality.py --real-widths   # hidden 4096, ffn 13696, 32/2 heads, vocab 151552, 2 layers

A random `GlmForCausalLM` in float32 gets a few outlier input channels in every matrix (`--outliers` columns of
each torch [out, in] weight scaled by `--outlier-scale`, as real checkpoints have), is saved by transformers and
converted by the real converter (bfloat16). Over one prompt of `--tokens` random ids, the next-token distribution
at every position is compared with float32 transformers: mean KL(transformers || ours) in nats, and the share of
positions whose most likely token agrees. Rows: our bf16 model, int8 and int4 weights (quantized while loading,
bf16 activations), each with our quantizer (absmax or, where the largest entry is negative, the finer
step that puts it on level -qmax - 1; glm4_jax/quant.py) and with plain absmax quantization of the same
weights (the search switched off), and int8 weights with an int8 KV cache (the prompt prefilled into the cache,
so attention reads the quantized keys and values).
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real-widths", action="store_true", help="GLM-4-9B's widths with --layers layers")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=320, help="prompt length (default 320)")
    p.add_argument("--outliers", type=int, default=4, help="outlier input channels per matrix (default 4)")
    p.add_argument("--outlier-scale", type=float, default=10.0, help="their scale (default 10)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--std", type=float, default=0.05, help="weight std of the random model (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def hf_model(args):
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    if args.real_widths:
        dims = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_attention_heads=32)
        dims |= dict(num_key_value_heads=2, head_dim=128)
    else:
        dims = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_attention_heads=4)
        dims |= dict(num_key_value_heads=2, head_dim=128)
    cfg = GlmConfig(
        **dims,
        num_hidden_layers=args.layers,
        max_position_embeddings=4096,
        rms_norm_eps=1.5625e-07,
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=[1],
    )
    torch.manual_seed(args.seed)
    model = GlmForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(args.std * torch.randn(p.shape, generator=gen))
                cols = torch.randperm(p.shape[1], generator=gen)[: args.outliers]
                p[:, cols] *= args.outlier_scale
    return model


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref_logp, logits):
    logp = log_softmax(np.asarray(logits, np.float64))
    kl = np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = np.mean(np.argmax(logp, -1) == np.argmax(ref_logp, -1))
    return float(kl.mean()), float(kl.max()), float(agree)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    t0 = time.perf_counter()
    model = hf_model(args)
    V = model.config.vocab_size
    tokens = np.random.default_rng(args.seed).integers(2, V, (1, args.tokens))
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens), use_cache=False).logits.double().numpy()[0]
    ref_logp = log_softmax(ref)
    work = pathlib.Path(tempfile.mkdtemp(prefix="glm4-quant-quality-"))
    model.save_pretrained(work / "hf")
    del model
    cmd = [sys.executable, "-m", "glm4_jax.convert", str(work / "hf"), str(work / "bf16"), "-q", "--no-hash"]
    subprocess.run(cmd, check=True)

    import jax.numpy as jnp

    from glm4_jax import checkpoint, quant
    from glm4_jax.model import KVCache

    positions = jnp.arange(args.tokens)[None]
    rows = []

    def run(name, kv_cache=None, **load_kw):
        m = checkpoint.load(work / "bf16", **load_kw)
        cache = None if kv_cache is None else KVCache.init(m.cfg, 1, args.tokens, kv_cache)
        logits, _ = m(jnp.asarray(tokens, jnp.int32), positions, cache)  # with a cache: attention reads it
        rows.append((name, *compare(ref_logp, np.asarray(logits)[0])))
        print(f"  {name}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    run("bf16")
    for scheme in ("int8", "int4"):
        kw = dict(quantize=scheme, group_size=args.group_size)
        run(f"{scheme} (ours)", **kw)
        quant.SEARCH = False  # plain absmax
        try:
            run(f"{scheme} (plain absmax)", **kw)
        finally:
            quant.SEARCH = True
    run("int8 + int8 KV cache", kv_cache="int8", quantize="int8")

    widths = "real widths" if args.real_widths else "small"
    print(
        f"\n{widths}, {args.layers} layers, {args.tokens}-token prompt, {args.outliers} outlier input channels x "
        f"{args.outlier_scale:g} per matrix, int4 group {args.group_size}; against float32 transformers\n"
    )
    print("| weights | mean KL (nats) | max KL | top-1 agreement |")
    print("|---|---|---|---|")
    for name, kl, kl_max, agree in rows:
        print(f"| {name} | {kl:.2e} | {kl_max:.2e} | {agree:.1%} |")
    print(f"\n({time.perf_counter() - t0:.0f} s; checkpoints in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
