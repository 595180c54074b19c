"""glm4-jax against transformers' GlmForCausalLM on the same device, in one call, with the ratios.

    python benchmarks/vs_transformers.py                       # random glm-4-9b-chat weights, bf16, on the GPU
    python benchmarks/vs_transformers.py --tiny                # a smoke test of the script itself (CPU is fine)

Runs `python -m glm4_jax.bench --json` in a subprocess (JAX takes the GPU while it runs), then the same workloads
through transformers in this process: decode with a static cache compiled by torch.compile (the fastest
transformers path measured on the H100) and prefill with the default attention. Prints both tables and the ratio
glm4-jax / transformers per workload. The weights are random in both (speed does not depend on their values).

Workloads, as in the speed targets: decode 1x128 and 64x1024 (batch x prompt, 128 new tokens), prefill 8192.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_jax(args) -> dict:
    cmd = [sys.executable, "-m", "glm4_jax.bench", "--random", "tiny" if args.tiny else "glm-4-9b-chat"]
    cmd += ["--decode", args.decode, "--prefill", args.prefill, "--new-tokens", str(args.new_tokens), "--json"]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"glm4_jax.bench failed:\n{out.stderr[-3000:]}")
    print(out.stdout.rsplit("\n", 2)[0])
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_model(args):
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    if args.tiny:
        from glm4_jax.fixtures import TINY, hf_glm_kwargs

        cfg = GlmConfig(**hf_glm_kwargs(TINY))
    else:
        cfg = GlmConfig()  # glm-4-9b-chat sizes
    torch.manual_seed(0)
    with torch.device(args.device):
        model = GlmForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf(args, model=None) -> list[dict]:
    """The decode and prefill workloads of `args` through transformers (`model`, default `hf_model(args)`)."""
    import torch

    model = hf_model(args) if model is None else model
    vocab = model.config.vocab_size
    rows = []
    if args.compile:  # once: each new shape recompiles the same wrapper
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    for item in filter(None, args.decode.split(",")):
        batch, prompt = (int(x) for x in item.split("x"))
        ids = torch.randint(0, min(vocab, 151329), (batch, prompt), device=args.device)
        kw = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(ids, **kw)  # compiles
            sync(args.device)
            compile_s = time.perf_counter() - t
            times, prefills = [], []
            for _ in range(args.repeats):
                sync(args.device)
                t = time.perf_counter()
                model.generate(ids, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
                sync(args.device)
                prefills.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.generate(ids, **kw)
                sync(args.device)
                times.append(time.perf_counter() - t)
        total, prefill = statistics.median(times), statistics.median(prefills)
        per_step = (total - prefill) / (args.new_tokens - 1)
        rows.append(
            {"workload": f"decode {batch}x{prompt}", "decode_tok_s": batch / per_step, "prefill_s": prefill}
            | {"compile_s": compile_s}
        )
    for item in filter(None, args.prefill.split(",")):
        n = int(item)
        ids = torch.randint(0, min(vocab, 151329), (1, n), device=args.device)
        with torch.no_grad():
            model(ids, logits_to_keep=1)
            times = []
            for _ in range(args.repeats):
                sync(args.device)
                t = time.perf_counter()
                model(ids, logits_to_keep=1)
                sync(args.device)
                times.append(time.perf_counter() - t)
        s = statistics.median(times)
        rows.append({"workload": f"prefill 1x{n}", "prefill_s": s, "prefill_tok_s": n / s})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model (a smoke test of this script)")
    p.add_argument("--device", help="torch device (default cuda when there is one, else cpu)")
    p.add_argument("--decode", help="default 1x128,64x1024 (--tiny: 1x32,4x64)")
    p.add_argument("--prefill", help="default 8192 (--tiny: 256)")
    p.add_argument("--new-tokens", type=int, help="default 128 (--tiny: 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="transformers without torch.compile")
    args = p.parse_args(argv)
    import torch

    tiny = {"decode": "1x32,4x64", "prefill": "256", "new_tokens": 16}
    full = {"decode": "1x128,64x1024", "prefill": "8192", "new_tokens": 128}
    for name, value in (tiny if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # torch.compile's reduce-overhead mode is CUDA graphs; on the CPU transformers runs eager.
    args.compile = args.compile and args.device.startswith("cuda")

    ours = {r["workload"]: r for r in run_jax(args)["rows"]}
    theirs = run_hf(args)
    print("\n| workload | metric | glm4-jax | transformers | ratio |\n| --- | --- | --- | --- | --- |")
    for r in theirs:
        o = ours[r["workload"]]
        metric = "decode_tok_s" if "decode_tok_s" in r else "prefill_tok_s"
        ratio = o[metric] / r[metric]
        print(f"| {r['workload']} | {metric} | {o[metric]:,.1f} | {r[metric]:,.1f} | {ratio:.2f}x |")
    import torch
    import transformers

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, torch.compile: {args.compile}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
