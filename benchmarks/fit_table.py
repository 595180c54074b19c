"""Which single device holds GLM-4-9B for each weight format, KV cache dtype and context: the memory planner's table.

    python benchmarks/fit_table.py [--preset glm-4-9b-chat] [--contexts 8192,32768,131072]

Each row is `python -m glm4_jax.sharding.plan --preset P --max-len N [--quantize Q] [--kv-cache C]` on one device
(batch 1): weights + KV cache per device, and the devices whose memory holds it with the planner's 10% headroom.
Activations, the compiled program and XLA's scratch space are not counted (the headroom is kept for them).
"""

from __future__ import annotations

import argparse
import sys

from glm4_jax.config import preset
from glm4_jax.sharding.plan import DEVICES, plan_memory

GiB = 1 << 30


NAMES = {"t4": "T4 16 GB", "v5e": "TPU v5e 16 GB", "l4": "L4 24 GB", "v4": "TPU v4 32 GB", "v6e": "TPU v6e 32 GB"}
NAMES |= {"a100-40": "A100 40 GB", "h100": "H100 80 GB", "a100-80": "A100 80 GB", "v5p": "TPU v5p", "h200": "H200"}


def _name(device: str) -> str:
    return NAMES.get(device, device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="glm-4-9b-chat")
    p.add_argument("--contexts", default="8192,32768,131072")
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    base = preset(args.preset)
    print(f"{args.preset}, batch 1, one device; a device fits when the total is <= 90% of its memory\n")
    print("| weights | KV cache | context | weights GiB | cache GiB | total GiB | smallest device that fits |")
    print("|---|---|---|---|---|---|---|")
    for quant in (None, "int8", "int4"):
        for kv in ("bfloat16", "int8"):
            for n in contexts:
                if n > base.max_seq_len:
                    continue
                cfg = base.replace(quant=quant)
                plan = plan_memory(cfg, None, max_len=n, cache_dtype=kv, n_devices=1)
                fits = [
                    name
                    for name, d in sorted(DEVICES.items(), key=lambda kv: kv[1].memory)
                    if plan.total_bytes <= d.memory * 0.9
                ]
                print(
                    f"| {quant or 'bf16'} | {'bf16' if kv == 'bfloat16' else kv} | {n // 1024}K | "
                    f"{plan.weights_bytes / GiB:.2f} | {plan.cache_bytes / GiB:.2f} | {plan.total_bytes / GiB:.2f} | "
                    f"{_name(fits[0]) if fits else 'none'} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
