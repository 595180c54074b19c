"""Per-token cost of a host-driven step against the compiled while-loop, on CPU, at GLM-4's real widths.

A 2-layer GLM-4-9B-chat (the real widths, random weights) decodes --tokens greedy tokens after a 16-token prompt,
batch 1, three ways: `Generator.generate` (one `lax.while_loop`), `Generator.stream` (one jitted step per token,
called from Python) and the continuous-batching `Engine` (one jitted step per token for its slots, --slots 1).
Each runs once to compile, then is timed; ms/token is the decode time over tokens - 1. It also prints the compiled
temp memory of the loop and of the step (`memory_analysis`), against the model's bytes.

On one CPU device the Generator runs from `glm4_jax.engine.cpu_params` (the layers held apart, bf16 matrices
converted to float32 once); --no-cpu-layout runs from the model's own stacked arrays, as before it.

    python benchmarks/stream_vs_loop.py --vocab 16384                  # bf16, a smaller embedding (less memory)
    python benchmarks/stream_vs_loop.py --vocab 16384 --no-cpu-layout
    python benchmarks/stream_vs_loop.py --dtype float32
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from glm4_jax.batching import Engine
from glm4_jax.config import preset
from glm4_jax.engine import _COMPILED, Generator
from glm4_jax.model import init_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--vocab", type=int, default=None, help="embedding rows (default GLM-4's 151,552)")
    ap.add_argument("--no-cpu-layout", action="store_true", help="run from the model's stacked arrays")
    args = ap.parse_args(argv)
    cfg = preset("glm-4-9b-chat").replace(num_layers=args.layers, dtype=args.dtype, max_seq_len=256)
    if args.vocab:
        cfg = cfg.replace(vocab_size=args.vocab, pad_token_id=0, eos_token_ids=(1,))
    model = init_model(cfg, seed=0)
    layout = False if args.no_cpu_layout else None
    prompt = list(range(100, 116))
    gen = Generator(model, prefill_chunk=16, cpu_layout=layout)
    n = args.tokens
    platform = jax.devices()[0].platform
    print(f"GLM-4-9B widths, {args.layers} layers, {args.dtype}, vocab {cfg.vocab_size}, {n} tokens, {platform}")
    print(f"cpu layout: {gen.cpu_layout}", flush=True)
    for name in ("loop", "stream"):
        for _ in range(2):  # the first call compiles
            res = gen.generate([prompt], max_new_tokens=n, stop_ids=()) if name == "loop" else None
            if name == "stream":
                res = gen.generate_streaming([prompt], max_new_tokens=n, stop_ids=())
        print(f"{name:7s} {res.decode_s / (n - 1) * 1e3:9.1f} ms/token  ids {res.ids[0]}", flush=True)
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # the model's own bytes
    for key in sorted(gen._keys, key=lambda k: k[0]):
        if key[0] in ("loop", "step"):
            temp = _COMPILED[key].memory_analysis().temp_size_in_bytes
            print(f"{key[0]:7s} compiled temp memory {temp / 2**20:9.1f} MiB ({temp / params:.2f}x the model's bytes)")
    engine = Engine(model, slots=1, max_len=128, prefill_chunk=16, cpu_layout=layout)
    for _ in range(2):
        times = []
        r = engine.submit(
            prompt, max_new_tokens=n, stop_ids=(), on_token=lambda r, t, times=times: times.append(time.perf_counter())
        )
        engine.run_until_idle()
    print(f"engine  {(times[-1] - times[0]) / (n - 1) * 1e3:9.1f} ms/token  ids {r.ids}", flush=True)


if __name__ == "__main__":
    main()
