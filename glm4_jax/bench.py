"""`python -m glm4_jax.bench`: measure prefill and decode on your own hardware.

    python -m glm4_jax.bench --random tiny                                # a smoke test, its own defaults
    python -m glm4_jax.bench --random glm-4-9b-chat                       # random full-size weights, bf16
    python -m glm4_jax.bench --ckpt out/glm-4-9b-chat --decode 1x128,64x1024 --prefill 8192,131072 --json
    python -m glm4_jax.bench --random glm-4-9b-chat --mesh tensor=8        # on 8 devices

Every workload runs through the same `Generator` that `generate` uses (chunked prefill, then the compiled
`lax.while_loop` decode), once to compile and then `--repeats` times; the table reports the median.

- decode `BxP`: batch B, prompt P tokens, `--new-tokens` greedy tokens with no stop id. decode tok/s counts
  B x (new tokens - 1) over the decode loop's time (the first token comes from the prefill).
- prefill `T`: a T-token prompt into the cache, then one token; tok/s = T / prefill seconds.
- bytes/step: what one decode step must read: every weight but the embedding table (only B rows of it are
  read), plus the K/V cache up to the context. GB/s = bytes/step / seconds per step. "floor" is the share of the
  device's memory bandwidth (`--bandwidth`, or the measured device-to-device copy rate of known devices) that
  this reaches: 100% is the memory-bound limit.
- compile: seconds spent compiling during the first run. peak memory: the device allocator's peak (GPU/TPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from typing import TYPE_CHECKING

from glm4_jax.config import (
    DEFAULT_GROUP_SIZE,
    DTYPES,
    KV_CACHE_DTYPES,
    PRESETS,
    QUANT_SCHEMES,
    ConfigError,
    np_dtype,
    preset,
)

if TYPE_CHECKING:  # JAX and the engine are imported once the arguments are checked
    from glm4_jax.engine import Generator

# Measured device-to-device copy rates (bytes read + written per second): the practical bandwidth ceiling.
BANDWIDTH = {"H100": 2.99e12, "H200": 4.3e12}


class BenchError(ValueError):
    pass


@dataclasses.dataclass
class Row:
    workload: str
    batch: int
    prompt: int
    new_tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_tok_s: float | None
    ms_per_step: float | None
    gb_per_s: float | None
    floor_share: float | None
    compile_s: float


def parse_workloads(decode: str, prefill: str) -> list[tuple[str, int, int]]:
    """("decode" | "prefill", batch, prompt tokens) from "1x128,64x1024" and "8192,131072"."""
    out = []
    for item in filter(None, (s.strip() for s in decode.split(","))):
        try:
            b, p = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise BenchError(f"--decode: {item!r} is not BATCHxPROMPT (e.g. 1x128)") from None
        if b < 1 or p < 1:
            raise BenchError(f"--decode: {item!r}: batch and prompt must be >= 1")
        out.append(("decode", b, p))
    for item in filter(None, (s.strip() for s in prefill.split(","))):
        if not item.isdigit() or int(item) < 1:
            raise BenchError(f"--prefill: {item!r} is not a positive token count")
        out.append(("prefill", 1, int(item)))
    if not out:
        raise BenchError("nothing to measure: give --decode and/or --prefill")
    return out


def step_bytes(model, batch: int, context: int, kv_cache: str | None = None) -> int:
    """Bytes one decode step reads: all weights but the embedding table, B embedding rows, the K/V cache (and its
    scales, for an int8 cache)."""
    import jax
    from flax import nnx

    cfg = model.cfg
    params = nnx.state(model, nnx.Param)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    embed = model.embed.get_value()
    itemsize = embed.dtype.itemsize
    total -= embed.size * itemsize - batch * cfg.hidden_size * itemsize
    layout = cfg.cache_layout(batch, context, kv_cache or embed.dtype.name)
    kv = sum(math.prod(shape) * np_dtype(dt).itemsize for name, (shape, _, dt) in layout.items() if name[0] in "kv")
    return total + kv


def peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def device_bandwidth(explicit: float | None) -> float | None:
    if explicit:
        return explicit * 1e9
    import jax

    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in BANDWIDTH.items() if name in kind), None)


def run_workload(gen: Generator, kind: str, batch: int, prompt: int, new_tokens: int, repeats: int, bw) -> Row:
    import numpy as np

    from glm4_jax.options import SamplingParams

    rng = np.random.RandomState(0)
    n_vocab = gen.n_vocab
    prompts = [rng.randint(0, n_vocab, prompt).tolist() for _ in range(batch)]
    steps = new_tokens if kind == "decode" else 1
    greedy = SamplingParams(temperature=0.0)
    kwargs = dict(max_new_tokens=steps, sampling=greedy, stop_ids=(), max_len=prompt + steps)
    first = gen.generate(prompts, **kwargs)  # compiles
    runs = [gen.generate(prompts, **kwargs) for _ in range(repeats)]
    prefill_s = statistics.median(r.prefill_s for r in runs)
    row = Row(
        workload=f"{kind} {batch}x{prompt}",
        batch=batch,
        prompt=prompt,
        new_tokens=steps,
        prefill_s=prefill_s,
        prefill_tok_s=batch * prompt / prefill_s,
        decode_tok_s=None,
        ms_per_step=None,
        gb_per_s=None,
        floor_share=None,
        compile_s=first.compile_s,
    )
    if kind == "decode" and steps > 1:
        decode_s = statistics.median(r.decode_s for r in runs)
        per_step = decode_s / (steps - 1)
        nbytes = step_bytes(gen_model(gen), batch, prompt + steps // 2, gen.cache_dtype.name)
        row.decode_tok_s = batch / per_step
        row.ms_per_step = per_step * 1e3
        row.gb_per_s = nbytes / per_step / 1e9
        if bw:
            row.floor_share = (nbytes / bw) / per_step
    return row


def gen_model(gen: Generator):
    from flax import nnx

    return nnx.merge(gen.graphdef, gen.state)


def model_config(args):
    """The model's Config from the arguments alone (no JAX): the preset, or the checkpoint's config.json (None when
    it cannot be read: `load` then says why)."""
    if args.ckpt:
        import os

        from glm4_jax.config import Config

        path = os.path.join(args.ckpt, "config.json")
        if not os.path.isfile(path):
            return None
        cfg = Config.from_file(path)
        if args.dtype:
            cfg = cfg.replace(dtype=args.dtype)
        return cfg.replace(quant=args.quantize, group_size=args.group_size) if args.quantize else cfg
    from glm4_jax.fixtures import TINY

    cfg = TINY if args.random == "tiny" else preset(args.random)
    return cfg.replace(dtype=args.dtype or "bfloat16", quant=args.quantize, group_size=args.group_size)


def default_prefill(cfg) -> str:
    """8192 tokens, or the largest power of two that fits the model's context with its one new token."""
    n = 8192
    while cfg is not None and n + 1 > cfg.max_seq_len and n > 1:
        n //= 2
    return str(n)


def memory_needed(cfg, workloads, new_tokens: int, kv_cache: str | None = None) -> int:
    """Bytes the weights and the largest workload's KV cache take (activations not counted)."""
    weights = sum(math.prod(shape) * np_dtype(dt).itemsize for shape, _, dt in cfg.stored_layout().values())
    cache = 0
    for kind, batch, prompt in workloads:
        slots = prompt + (new_tokens if kind == "decode" else 1)
        layout = cfg.cache_layout(batch, slots, kv_cache)
        cache = max(cache, sum(math.prod(shape) * np_dtype(dt).itemsize for shape, _, dt in layout.values()))
    return weights + cache


def check_fit(cfg, workloads, new_tokens: int, kv_cache: str | None, device_bytes: int | None) -> None:
    """Refuses (BenchError) a workload longer than the model's context, or weights plus cache beyond the memory of
    the device(s), before anything is built."""
    if cfg is None:
        return
    for kind, batch, prompt in workloads:
        need = prompt + (new_tokens if kind == "decode" else 1)
        if need > cfg.max_seq_len:
            raise BenchError(
                f"{kind} {batch}x{prompt} needs {need} tokens of context, more than the model's {cfg.max_seq_len}"
            )
    need = memory_needed(cfg, workloads, new_tokens, kv_cache)
    if device_bytes and need > device_bytes:
        raise BenchError(
            f"the weights and the largest KV cache need {need / 2**30:.1f} GiB, more than the "
            f"{device_bytes / 2**30:.1f} GiB of device memory"
        )


def device_memory(mesh) -> int | None:
    """Bytes the allocator may use on the devices of `mesh` (all devices: one) together; None when unknown (CPU)."""
    import jax

    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    return None if None in limits else sum(limits)


def load_model(args, mesh, cfg=None):
    if args.ckpt:
        from glm4_jax import checkpoint

        return checkpoint.load(
            args.ckpt, mesh=mesh, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size
        )
    from glm4_jax.placement import random_model

    return random_model(cfg if cfg is not None else model_config(args), mesh)


def format_table(rows: list[Row], info: dict) -> str:
    head = ["workload", "prefill s", "prefill tok/s", "decode tok/s", "ms/step", "GB/s", "floor", "compile s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            " | ".join(
                [
                    r.workload,
                    f(r.prefill_s, ".3f"),
                    f(r.prefill_tok_s, ",.0f"),
                    f(r.decode_tok_s, ",.1f"),
                    f(r.ms_per_step, ".2f"),
                    f(r.gb_per_s, ",.0f"),
                    "-" if r.floor_share is None else f"{100 * r.floor_share:.0f}%",
                    f(r.compile_s, ".1f"),
                ]
            )
        )
    tail = [f"{k}: {v}" for k, v in info.items()]
    return "\n".join(["| " + line + " |" for line in lines] + [""] + tail)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m glm4_jax.bench",
        description=__doc__.split("\n\n", 1)[0] + " Prints a table (or --json) of prefill and decode speed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="DIR", help="a converted checkpoint (python -m glm4_jax.convert)")
    src.add_argument(
        "--random",
        metavar="PRESET",
        choices=[*PRESETS, "tiny"],
        help="random weights of a preset: glm-4-9b, glm-4-9b-chat, glm-4-9b-chat-1m, or tiny (a smoke test)",
    )
    p.add_argument("--decode", default="1x128", metavar="BxP,...", help="decode workloads (default 1x128)")
    p.add_argument(
        "--prefill", metavar="T,...", help="prefill workloads (default 8192, or what fits a shorter context)"
    )
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per decode workload (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one (default 3)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill call (default 2048)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 / the checkpoint's")
    p.add_argument("--quantize", choices=QUANT_SCHEMES, help="int8 or int4 weights (random, or quantized on load)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size (default 128)")
    p.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, help="KV cache dtype (default: the compute dtype)")
    p.add_argument("--mesh", metavar="SPEC", help="device mesh, e.g. tensor=8 (default: one device)")
    p.add_argument("--bandwidth", type=float, metavar="GB/s", help="memory bandwidth for the floor column")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.new_tokens < 2 or args.repeats < 1 or args.prefill_chunk < 1:
            raise BenchError("--new-tokens must be >= 2, --repeats and --prefill-chunk >= 1")
        cfg = model_config(args)
        prefill = args.prefill if args.prefill is not None else default_prefill(cfg)
        workloads = parse_workloads(args.decode, prefill)
        check_fit(cfg, workloads, args.new_tokens, args.kv_cache, None)
        if args.mesh:
            from glm4_jax.sharding import parse_mesh_spec

            parse_mesh_spec(args.mesh, keep_rest=True)  # the spec's syntax, before JAX starts
    except (BenchError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    import jax
    from flax import nnx

    from glm4_jax.engine import Generator

    try:
        mesh = None
        if args.mesh:
            from glm4_jax.sharding import make_mesh

            mesh = make_mesh(args.mesh)
        check_fit(cfg, workloads, args.new_tokens, args.kv_cache, device_memory(mesh))
        t = time.perf_counter()
        model = load_model(args, mesh, cfg)
        jax.block_until_ready(nnx.state(model))
        load_s = time.perf_counter() - t
        longest = max(p + (args.new_tokens if k == "decode" else 1) for k, _, p in workloads)
        if longest > model.cfg.max_seq_len:
            raise BenchError(f"a workload needs {longest} tokens, more than the model's {model.cfg.max_seq_len}")
    except (BenchError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    gen = Generator(model, prefill_chunk=args.prefill_chunk, mesh=mesh, kv_cache=args.kv_cache)
    bw = device_bandwidth(args.bandwidth)
    rows = []
    for kind, batch, prompt in workloads:
        rows.append(run_workload(gen, kind, batch, prompt, args.new_tokens, args.repeats, bw))
        print(f"  done: {rows[-1].workload}", file=sys.stderr, flush=True)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    peak = peak_memory()
    info = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": args.ckpt or args.random,
        "parameters": params,
        "dtype": str(model.embed.get_value().dtype),
        "mesh": args.mesh or "one device",
        "load_s": round(load_s, 2),
        "peak_memory_gib": None if peak is None else round(peak / 2**30, 2),
        "bandwidth_gb_s": None if bw is None else bw / 1e9,
    }
    print(format_table(rows, info))
    if args.json:
        print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], **info}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
