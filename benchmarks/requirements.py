"""The README's requirements table: memory of each GLM-4-9B model, dtype and context, and the devices it fits.

    python3 benchmarks/requirements.py            # the markdown table of README.md ("What it needs")

Every figure is `glm4_jax.sharding.plan.plan_memory`, the planner of `python -m glm4_jax.sharding.plan`, for batch
1: weights plus the KV cache of the whole context, per device, with the planner's 10% headroom. "Fits on one" lists
the devices (of the planner's table) where one device is enough; "smallest mesh" gives, for the devices where it is
not, the fewest devices that hold it (`tensor` up to the kv heads, then `sequence`), each of which is one command:

    python -m glm4_jax.sharding.plan --preset glm-4-9b-chat-1m --max-len 1048576 --mesh tensor=2 --device h100
"""

from __future__ import annotations

import os

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


def main() -> None:
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
