"""Context parallelism at full size, compiled without allocating: the glm-4-9b-chat-1m prefill of 1,048,576 tokens.

    python3 benchmarks/cp_compile.py                     # sequence=8 and sequence=16, 1,048,576 tokens
    python3 benchmarks/cp_compile.py --devices 8 --tokens 4096 --preset glm-4-9b   # smaller, faster
    python3 benchmarks/cp_compile.py --single             # also one device (for the per-device ratio)
    python3 benchmarks/cp_compile.py --preset tiny --tokens 256 --devices 2 4 --single   # seconds (tests)

For each device count N, a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N (fake CPU devices)
lowers and compiles the cacheless prefill (`jit_forward(..., logits="last")` on mesh sequence=N, ring attention)
from abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated, no weights exist), and prints XLA's flops and
bytes accessed per device (`compiled.cost_analysis()`), the compiled temp memory per device
(`compiled.memory_analysis().temp_size_in_bytes`), and beside them the memory planner's prediction
(`glm4_jax.sharding.plan.activation_bytes` for the activations, `plan_memory` for the weights).

XLA's cost analysis counts the body of a while loop once: the layer scan and the ring's fori_loop are one
iteration each in its flops, so the flops are those of one layer (and one ring step), per device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 1 << 30


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    from glm4_jax.config import preset
    from glm4_jax.fixtures import SHARDABLE
    from glm4_jax.model import abstract_model
    from glm4_jax.placement import abstract_params, jit_forward
    from glm4_jax.sharding import make_mesh, mesh_sizes
    from glm4_jax.sharding.plan import activation_bytes, plan_memory

    cfg = SHARDABLE.replace(max_seq_len=args.tokens) if args.preset == "tiny" else preset(args.preset)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    spec = "data=1" if args.worker == 1 else f"sequence={args.worker}"
    mesh = make_mesh(spec, devices=jax.devices()[: args.worker])
    model = abstract_model(cfg)
    model.attention_impl = "ring" if args.worker > 1 else "blockwise"
    forward = jit_forward(model, mesh, batch=1, logits="last")
    tokens = jax.ShapeDtypeStruct((1, args.tokens), jnp.int32)
    t0 = time.perf_counter()
    lowered = forward.lower(abstract_params(model, mesh), tokens, tokens)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    sizes = mesh_sizes(mesh)
    plan = plan_memory(cfg, mesh, batch=1, max_len=args.worker * 2)  # the weights only are used
    return {
        "devices": args.worker,
        "mesh": spec,
        "tokens": args.tokens,
        "preset": args.preset,
        "flops": cost["flops"],
        "bytes_accessed": cost["bytes accessed"],
        "temp_bytes": mem.temp_size_in_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
        "planned_activation_bytes": activation_bytes(cfg, sizes, 1, args.tokens, ring=args.worker > 1),
        "planned_weight_bytes": plan.weights_bytes,
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="glm-4-9b-chat-1m", help="a glm4_jax.config preset, or 'tiny' (tests)")
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--devices", type=int, nargs="+", default=[8, 16], help="device counts (sequence=N each)")
    p.add_argument("--single", action="store_true", help="also compile on one device")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="weights and activations (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print one JSON line per device count")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens < 1 or any(n < 1 for n in args.devices):
        print(f"error: --tokens and --devices must be positive (got {args.tokens}, {args.devices})", file=sys.stderr)
        return 2
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    counts = ([1] if args.single else []) + list(args.devices)
    rows = []
    for n in counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, __file__, "--worker", str(n), "--preset", args.preset, "--tokens", str(args.tokens)]
        cmd += ["--dtype", args.dtype] if args.dtype else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"error: the {n}-device compile failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            return 1
        row = json.loads(lines[-1][len("RESULT ") :])
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    one = rows[0] if args.single else None
    dtype = args.dtype or "the preset's dtype"
    print(f"{args.preset} ({dtype}): cacheless prefill of {args.tokens:,} tokens, per device (fake CPU devices)")
    print("mesh          flops (1 layer)  x 1 dev  bytes accessed  temp (XLA)  activations (planner)  compile")
    for r in rows:
        ratio = f"{r['flops'] / one['flops']:.3f}" if one else "-"
        print(
            f"{r['mesh']:<13} {r['flops']:15.3e}  {ratio:>7}  {r['bytes_accessed']:14.3e}  "
            f"{r['temp_bytes'] / GiB:7.2f} GiB  {r['planned_activation_bytes'] / GiB:18.2f} GiB  "
            f"{r['compile_s']:6.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
