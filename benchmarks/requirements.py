"""The README's requirements table: memory of each GLM-4-9B model, dtype and context, and the devices it fits.

    python3 benchmarks/requirements.py              # the markdown table of README.md ("What it needs")
    python3 benchmarks/requirements.py --quantized  # int8 / int4 weights and KV caches on one device (Quantization)

Every figure is `glm4_jax.sharding.plan.plan_memory`, the planner of `python -m glm4_jax.sharding.plan`, for batch
1: weights plus the KV cache of the whole context, per device, with the planner's 10% headroom. "Fits on one" lists
the devices (of the planner's table) where one device is enough; "smallest mesh" gives, for the devices where it is
not, the fewest devices that hold it (`tensor` up to the kv heads, then `sequence`), each of which is one command:

    python -m glm4_jax.sharding.plan --preset glm-4-9b-chat-1m --max-len 1048576 --mesh tensor=2 --device h100
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the planner needs no accelerator

from glm4_jax.config import preset  # noqa: E402
from glm4_jax.sharding.plan import DEVICES, plan_memory  # noqa: E402

ROWS = [
    ("glm-4-9b", 8192),
    ("glm-4-9b-chat", 8192),
    ("glm-4-9b-chat", 131072),
    ("glm-4-9b-chat-1m", 131072),
    ("glm-4-9b-chat-1m", 1048576),
]
DTYPES = ("bfloat16", "float32")
SHOWN = ("h100", "a100-40", "v5e", "v4")  # the devices of the "smallest mesh" column


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def smallest_mesh(cfg, max_len: int, device: str) -> str | None:
    for n in (2, 4, 8, 16, 32, 64):
        tensor = min(n, cfg.num_kv_heads)
        spec = f"tensor={tensor}" + (f",sequence={n // tensor}" if n > tensor else "")
        if plan_memory(cfg, spec, max_len=max_len, device=device).fits:
            return f"{n} x {device} (`--mesh {spec}`)"
    return None


NAMES = {"t4": "T4 16 GB", "v5e": "TPU v5e 16 GB", "l4": "L4 24 GB", "v4": "TPU v4 32 GB", "v6e": "TPU v6e 32 GB"}
NAMES |= {"a100-40": "A100 40 GB", "h100": "H100 80 GB", "a100-80": "A100 80 GB", "v5p": "TPU v5p", "h200": "H200"}


def quantized_table(name: str = "glm-4-9b-chat", contexts=(8192, 32768, 131072)) -> None:
    """Each weight format and KV cache dtype at each context on one device: the smallest device that holds it."""
    print("| weights | KV cache | context | weights GiB | cache GiB | total GiB | smallest device that fits |")
    print("|---|---|---|---|---|---|---|")
    for quant in (None, "int8", "int4"):
        for kv in ("bfloat16", "int8"):
            for max_len in contexts:
                cfg = preset(name).replace(quant=quant)
                plan = plan_memory(cfg, None, max_len=max_len, cache_dtype=kv)
                fits = [
                    d
                    for d in sorted(DEVICES, key=lambda d: DEVICES[d].memory)
                    if plan.total_bytes <= 0.9 * DEVICES[d].memory
                ]
                sizes = [f"{n / 2**30:.2f}" for n in (plan.weights_bytes, plan.cache_bytes, plan.total_bytes)]
                kv_name = "bf16" if kv == "bfloat16" else kv
                smallest = NAMES.get(fits[0], fits[0]) if fits else "none"
                print(f"| {quant or 'bf16'} | {kv_name} | {max_len // 1024}K | {' | '.join(sizes)} | {smallest} |")


def main() -> None:
    if "--quantized" in sys.argv[1:]:
        quantized_table()
        return
    print("| model | dtype | context | weights | KV cache | total | fits on one | smallest mesh |")
    print("|---|---|---|---|---|---|---|---|")
    for name, max_len in ROWS:
        for dtype in DTYPES:
            cfg = preset(name).replace(dtype=dtype)
            plan = plan_memory(cfg, None, max_len=max_len)
            fits = [d for d in DEVICES if plan_memory(cfg, None, max_len=max_len, device=d).fits]
            more = [smallest_mesh(cfg, max_len, d) for d in SHOWN if d not in fits]
            print(
                f"| {name} | {dtype} | {max_len:,} | {gib(plan.weights_bytes)} | {gib(plan.cache_bytes)} | "
                f"{gib(plan.total_bytes)} | {', '.join(fits) or 'none'} | {'; '.join(m for m in more if m) or '-'} |"
            )


if __name__ == "__main__":
    main()
