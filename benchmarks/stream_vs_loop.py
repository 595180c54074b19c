"""Per-token cost of a host-driven step against the compiled while-loop, on CPU, at GLM-4's real widths.

A 2-layer GLM-4-9B-chat (the real widths and vocabulary, random weights) decodes --tokens greedy tokens after a
16-token prompt, batch 1, three ways: `Generator.generate` (one `lax.while_loop`), `Generator.stream` (one
jitted step per token, called from Python) and the continuous-batching `Engine` (one jitted step per token for
its slots, --slots 1). Each runs once to compile, then is timed; ms/token is the decode time over tokens - 1.
With --dtype float32 the weights are float32 (converted once), so XLA has no bf16 weight to convert per call.

    python benchmarks/stream_vs_loop.py                     # bf16
    python benchmarks/stream_vs_loop.py --dtype float32
"""

from __future__ import annotations

import argparse
import time

import jax

from glm4_jax.batching import Engine
from glm4_jax.config import preset
from glm4_jax.engine import Generator
from glm4_jax.model import init_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args(argv)
    cfg = preset("glm-4-9b-chat").replace(num_layers=args.layers, dtype=args.dtype, max_seq_len=256)
    model = init_model(cfg, seed=0)
    prompt = list(range(100, 116))
    gen = Generator(model, prefill_chunk=16)
    n = args.tokens
    print(f"GLM-4-9B widths, {args.layers} layers, {args.dtype}, {n} tokens, {jax.devices()[0].platform}", flush=True)
    for name in ("loop", "stream"):
        for _ in range(2):  # the first call compiles
            res = gen.generate([prompt], max_new_tokens=n, stop_ids=()) if name == "loop" else None
            if name == "stream":
                res = gen.generate_streaming([prompt], max_new_tokens=n, stop_ids=())
        print(f"{name:7s} {res.decode_s / (n - 1) * 1e3:9.1f} ms/token  ids {res.ids[0]}", flush=True)
    engine = Engine(model, slots=1, max_len=128, prefill_chunk=16)
    for _ in range(2):
        times = []
        r = engine.submit(
            prompt, max_new_tokens=n, stop_ids=(), on_token=lambda r, t, times=times: times.append(time.perf_counter())
        )
        engine.run_until_idle()
    print(f"engine  {(times[-1] - times[0]) / (n - 1) * 1e3:9.1f} ms/token  ids {r.ids}", flush=True)


if __name__ == "__main__":
    main()
