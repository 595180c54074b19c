"""Memory planner: the per-device bytes of GLM-4's weights and KV cache on a mesh, and whether they fit a device.

    python -m glm4_jax.sharding.plan --preset glm-4-9b-chat-1m --mesh sequence=8 --batch 1 --max-len 1048576 \\
        --device h100 [--json]

The bytes come from the rules the real run uses: each array of `Config.model_layout()` and `Config.cache_layout()`
gets its `NamedSharding` on an `AbstractMesh` (`named_sharding`, as `glm4_jax.placement` does for a real model),
then `NamedSharding.shard_shape`, so the planner and a sharded model agree array by array. No device is needed:
a 16-device plan runs on a laptop.

What is counted: weights and KV cache (k, v, pos), and with `prefill_chunk` (`--prefill-chunk`) the activations of
one layer of a prefill chunk (`activation_bytes`, an estimate from the shapes: see docs/LONG_CONTEXT.md for how it
compares with XLA's compiled temp memory). What is not: the compiled program, XLA's scratch space and
fragmentation; `headroom` (10% of the device by default) is set aside for them. Decoding needs little activation
memory; a long prompt should be prefilled in chunks (or with ring attention on `sequence`), or the score matrices
alone exceed any device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from glm4_jax.config import (
    DEFAULT_GROUP_SIZE,
    DTYPES,
    KV_CACHE_DTYPES,
    QUANT_SCHEMES,
    Config,
    ConfigError,
    kv_copies,
    np_dtype,
    preset,
)
from glm4_jax.config import PRESETS as CONFIG_PRESETS

from .mesh import MESH_AXES, MeshSpec, abstract_mesh, mesh_sizes, mesh_str, parse_mesh_spec

if TYPE_CHECKING:  # the rules import JAX; the command line checks its arguments before that
    from jax.sharding import AbstractMesh, Mesh

    from .rules import Rules

GiB = 1 << 30
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes the device reports (nvidia-smi total for GPUs, HBM per chip for TPUs)
    gpu: bool


DEVICES = {
    d.name: d
    for d in (
        Device("t4", 15360 * MiB, True),  # T4 16GB: 15 GiB as nvidia-smi reports it
        Device("l4", 23034 * MiB, True),  # L4 24GB: 22.5 GiB as nvidia-smi reports it
        Device("a100-40", 40960 * MiB, True),
        Device("a100-80", 81920 * MiB, True),
        Device("h100", 81559 * MiB, True),  # H100 80GB (SXM): 79.6 GiB
        Device("h200", 143771 * MiB, True),  # H200 141GB: 140.4 GiB
        Device("v4", 32 * GiB, False),
        Device("v5e", 16 * GiB, False),
        Device("v5p", 95 * GiB, False),
        Device("v6e", 32 * GiB, False),
    )
}

DEFAULT_HEADROOM = 0.10


@dataclasses.dataclass
class ArrayPlan:
    group: str  # "weights" or "cache"
    name: str  # parameter path ("layers/q") or "cache/k"
    shape: tuple[int, ...]
    dtype: str
    spec: tuple  # mesh axes of each dim: None, "tensor", or ("data", "fsdp")
    shard_shape: tuple[int, ...]
    bytes_per_device: int
    global_bytes: int
    replicated_over: tuple[str, ...]  # mesh axes (size > 1) the array is copied over


@dataclasses.dataclass
class MemoryPlan:
    model: str
    mesh: dict[str, int]
    n_devices: int
    batch: int
    max_len: int
    arrays: list[ArrayPlan]
    weights_bytes: int  # per device
    cache_bytes: int  # per device
    total_bytes: int  # per device: weights + cache + activations
    device: str | None
    device_bytes: int | None
    headroom: float
    budget_bytes: int | None  # device_bytes * (1 - headroom)
    fits: bool | None
    notes: list[str]
    prefill_chunk: int | None = None  # tokens of the prefill chunk whose activations are counted (None: none)
    activation_bytes: int = 0  # per device, for that chunk (`activation_bytes`)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for a in d["arrays"]:
            a["shape"], a["shard_shape"] = list(a["shape"]), list(a["shard_shape"])
            a["spec"] = [list(e) if isinstance(e, tuple) else e for e in a["spec"]]
            a["replicated_over"] = list(a["replicated_over"])
        return d


def _as_mesh(mesh: Mesh | AbstractMesh | MeshSpec | None, n_devices: int | None) -> Mesh | AbstractMesh:
    from jax.sharding import AbstractMesh, Mesh

    if isinstance(mesh, (Mesh, AbstractMesh)):
        return mesh
    return abstract_mesh(mesh, n_devices)


def _array_plan(group, name, shape, dtype, sharding, sizes) -> ArrayPlan:
    shard = tuple(sharding.shard_shape(tuple(shape)))
    itemsize = np.dtype(dtype).itemsize
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    used = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    return ArrayPlan(
        group=group,
        name=name,
        shape=tuple(shape),
        dtype=np.dtype(dtype).name,
        spec=spec,
        shard_shape=shard,
        bytes_per_device=math.prod(shard) * itemsize,
        global_bytes=math.prod(shape) * itemsize,
        replicated_over=tuple(a for a, n in sizes.items() if n > 1 and a not in used),
    )


def activation_bytes(cfg: Config, sizes: dict[str, int], batch: int, chunk: int, *, ring: bool) -> int:
    """Estimated peak activation bytes per device of a prefill chunk of `chunk` tokens x `batch` rows.

    Context parallelism splits the hidden states along T over `sequence` (when it divides the chunk), `data` (and
    `fsdp` when it divides) the rows, `tensor` the heads and the ffn. The layers run one at a time under a scan, so
    the peak is one layer's: the residual stream in and out [b, t, D], plus the larger of the attention phase (the
    normed input, q, k, v and the output, the float32 accumulator of the online softmax, and with `ring` the
    keys/values being received, double-buffered) and the MLP phase (the normed input, gate, up and their product
    [b, t, F']); or, after the layers, the float32 logits of the last token. `ring`: ring prefill (queries local);
    else chunked prefill against a sequence-sharded cache, whose queries and softmax state cover the whole chunk.
    """
    item = np_dtype(cfg.dtype).itemsize
    seq, tensor = sizes.get("sequence", 1), sizes.get("tensor", 1)
    rows = sizes.get("data", 1)
    if batch % rows == 0 and batch % (rows * sizes.get("fsdp", 1)) == 0:
        rows *= sizes.get("fsdp", 1)
    b = -(-batch // rows)
    t = chunk // seq if chunk % seq == 0 else chunk
    tq = t if ring else chunk  # queries (and their softmax state) per device
    n_loc = cfg.num_heads // tensor if cfg.num_heads % tensor == 0 else cfg.num_heads
    k_loc = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
    f_loc = cfg.intermediate_size // tensor if cfg.intermediate_size % tensor == 0 else cfg.intermediate_size
    H, D = cfg.head_dim, cfg.hidden_size
    residual = 2 * b * t * D * item
    attn = b * t * D * item + b * (2 * tq * n_loc + 2 * t * k_loc) * H * item + b * tq * n_loc * (H + 2) * 4
    if ring:
        attn += 2 * b * t * 2 * k_loc * H * item
    mlp = b * t * D * item + 3 * b * t * f_loc * item
    v_loc = cfg.vocab_size // tensor if cfg.vocab_size % tensor == 0 else cfg.vocab_size
    return residual + max(attn, mlp, b * v_loc * 4)


def plan_memory(
    cfg: Config,
    mesh: Mesh | AbstractMesh | MeshSpec | None = None,
    *,
    batch: int = 1,
    max_len: int | None = None,
    device: str | None = None,
    device_memory: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    n_devices: int | None = None,
    cache_dtype=None,
    rules: Rules | None = None,
    name: str | None = None,
    prefill_chunk: int | None = None,
) -> MemoryPlan:
    """Per-device memory of `cfg`'s weights and a KV cache of `batch` x `max_len` on `mesh`.

    Args:
      cfg: the model config (its dtype is the weights' dtype).
      mesh: a Mesh, an AbstractMesh, or a spec ("sequence=8"); -1 in a spec needs `n_devices`.
      max_len: cache slots (default cfg.max_seq_len).
      device: a name in DEVICES, or None with `device_memory` (bytes), or neither (no fit verdict).
      headroom: fraction of the device kept free for activations, the program and XLA's scratch space.
      cache_dtype: the cache dtype (default cfg.dtype).
      prefill_chunk: tokens per prefill chunk: adds its activations per device (`activation_bytes`; ring prefill
        when the chunk fills the cache on a `sequence` mesh, else chunked prefill against the cache).
    Raises:
      ShardingError when the mesh cannot hold the model (a big weight it cannot divide); ValueError for a bad mesh
      spec or device name.
    """
    from .rules import named_sharding

    mesh = _as_mesh(mesh, n_devices)
    sizes = mesh_sizes(mesh)
    max_len = cfg.max_seq_len if max_len is None else max_len
    _check_settings(device, headroom)

    arrays = []
    copies = kv_copies(cfg.num_kv_heads, sizes.get("tensor", 1))  # the fused qkv as the model holds it on this mesh
    for path, (shape, axes, dtype) in sorted(cfg.model_layout(copies).items()):
        sharding = named_sharding(mesh, axes, shape, rules, path)
        arrays.append(_array_plan("weights", path, shape, np_dtype(dtype), sharding, sizes))
    for field, (shape, axes, dtype) in cfg.cache_layout(batch, max_len, cache_dtype).items():
        sharding = named_sharding(mesh, axes, shape, rules, f"cache/{field}")
        arrays.append(_array_plan("cache", f"cache/{field}", shape, np_dtype(dtype), sharding, sizes))

    weights = sum(a.bytes_per_device for a in arrays if a.group == "weights")
    cache_bytes = sum(a.bytes_per_device for a in arrays if a.group == "cache")
    acts = 0
    if prefill_chunk is not None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
        acts = activation_bytes(cfg, sizes, batch, prefill_chunk, ring=prefill_chunk == max_len)
    total = weights + cache_bytes + acts
    if device is not None:
        device_memory = DEVICES[device].memory
    budget = None if device_memory is None else int(device_memory * (1 - headroom))
    plan = MemoryPlan(
        model=name or "custom",
        mesh=dict(sizes),
        n_devices=math.prod(sizes.values()),
        batch=batch,
        max_len=max_len,
        arrays=arrays,
        weights_bytes=weights,
        cache_bytes=cache_bytes,
        total_bytes=total,
        device=device,
        device_bytes=device_memory,
        headroom=headroom,
        budget_bytes=budget,
        fits=None if budget is None else total <= budget,
        notes=[],
        prefill_chunk=prefill_chunk,
        activation_bytes=acts,
    )
    plan.notes = _notes(cfg, plan)
    return plan


def _check_settings(device: str | None, headroom: float) -> None:
    if device is not None and device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is a fraction in [0, 1), got {headroom}")


def _notes(cfg: Config, plan: MemoryPlan) -> list[str]:
    notes = []
    sizes = plan.mesh
    tensor = sizes.get("tensor", 1)
    by_name = {a.name: a for a in plan.arrays}
    if tensor > 1 and "tensor" in by_name["cache/k"].replicated_over:
        kv = by_name["cache/k"].bytes_per_device + by_name["cache/v"].bytes_per_device
        notes.append(
            f"kv_heads={cfg.num_kv_heads} cannot be divided by tensor={tensor}: the k/v projections and the cache's "
            f"k, v are replicated over tensor (every device holds all {cfg.num_kv_heads} kv heads). Cost: the cache "
            f"takes {_fmt(kv)} per device instead of {_fmt(kv // tensor)} were the heads divisible "
            f"({_fmt(kv - kv // tensor)} more), and every device computes the k and v projections of all heads "
            f"(each {cfg.num_kv_heads}/{cfg.num_heads} of the q projection's work). A tensor size that divides "
            f"{cfg.num_kv_heads} avoids it (put the other devices on sequence, fsdp or data)."
        )
    copies = [a for a in ("data", "sequence") if sizes.get(a, 1) > 1]
    if copies:
        what = " x ".join(f"{a}={sizes[a]}" for a in copies)
        notes.append(
            f"The weights are copied over {what}: only fsdp and tensor divide weights. Add tensor (or fsdp) to "
            "shrink the weights per device."
        )
    if sizes.get("fsdp", 1) > 1 and "fsdp" in by_name["cache/k"].replicated_over:
        notes.append(
            f"batch={plan.batch} is not divisible by fsdp={sizes['fsdp']}: the cache is copied over fsdp (its rows "
            "split over fsdp only when they divide)."
        )
    if plan.max_len > cfg.max_seq_len:
        notes.append(f"max_len {plan.max_len} exceeds the model's trained context ({cfg.max_seq_len}).")
    if plan.device and DEVICES[plan.device].gpu:
        notes.append(
            "JAX preallocates 75% of a GPU's memory by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (or "
            "XLA_PYTHON_CLIENT_PREALLOCATE=false) for this budget to be available."
        )
    if plan.prefill_chunk is None:
        what = "activations, the compiled program"
    else:
        what = f"activations beyond one layer of a {plan.prefill_chunk:,}-token prefill chunk, the compiled program"
    notes.append(
        f"Not counted: {what}, XLA scratch space ({plan.headroom:.0%} headroom is kept "
        "for them). Decode needs little; prefill long prompts in chunks or with ring attention on `sequence`."
    )
    return notes


# ---- output ---------------------------------------------------------------------------------------------------


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _spec_str(spec: tuple) -> str:
    return "(" + ", ".join("-" if e is None else e if isinstance(e, str) else "+".join(e) for e in spec) + ")"


def format_plan(plan: MemoryPlan) -> str:
    rows = [("array", "shape", "dtype", "mesh axes per dim", "per device")]
    for group in ("weights", "cache"):
        for a in plan.arrays:
            if a.group == group:
                shape = "[" + ", ".join(str(d) for d in a.shape) + "]"
                rows.append((a.name, shape, a.dtype, _spec_str(a.spec), _fmt(a.bytes_per_device)))
        total = plan.weights_bytes if group == "weights" else plan.cache_bytes
        rows.append((f"= {group}", "", "", "", _fmt(total)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        f"{plan.model}: batch {plan.batch} x {plan.max_len:,} slots on mesh {mesh_str(plan.mesh)} "
        f"({plan.n_devices} device{'' if plan.n_devices == 1 else 's'})",
        "",
    ]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"per device: weights {_fmt(plan.weights_bytes)} + cache {_fmt(plan.cache_bytes)}"
        + (f" + activations {_fmt(plan.activation_bytes)}" if plan.prefill_chunk is not None else "")
        + f" = {_fmt(plan.total_bytes)}"
    )
    if plan.budget_bytes is not None:
        verdict = "FITS" if plan.fits else "DOES NOT FIT"
        lines.append(
            f"{plan.device or 'device'}: {_fmt(plan.device_bytes)}, budget {_fmt(plan.budget_bytes)} after "
            f"{plan.headroom:.0%} headroom -> {verdict} ({plan.total_bytes / plan.budget_bytes:.0%} of the budget)"
        )
    if plan.notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)


def _load_config(args) -> tuple[Config, str]:
    if args.config:
        path = args.config
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return Config.from_file(path), os.path.basename(os.path.dirname(os.path.abspath(path)))
    return preset(args.preset), args.preset


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns 0 when the plan fits (or no device is given), 1 when it does not fit, 2 on bad
    input (one `error: ...` line)."""
    p = argparse.ArgumentParser(
        prog="python -m glm4_jax.sharding.plan",
        description="Per-device memory of GLM-4's weights and KV cache on a device mesh. Exit status: 0 when it "
        "fits (or no --device is given), 1 when it does not fit, 2 on bad input.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="glm-4-9b-chat", choices=sorted(CONFIG_PRESETS))
    src.add_argument("--config", help="a config.json, or a converted checkpoint directory")
    p.add_argument("--mesh", default="", help=f"e.g. 'tensor=4,sequence=2' (axes {', '.join(MESH_AXES)}; missing: 1)")
    p.add_argument("--devices", type=int, help="device count, for a -1 in --mesh")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-len", type=int, help="KV cache slots (default: the model's max_seq_len)")
    p.add_argument("--device", choices=sorted(DEVICES), help="check the plan against this device")
    p.add_argument("--device-memory", type=float, help="device memory in GiB (instead of --device)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="fraction kept free (default 0.1)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: config's)")
    p.add_argument("--quantize", choices=QUANT_SCHEMES, help="int8 or int4 weights (default: none)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size (default 128)")
    p.add_argument(
        "--cache-dtype", "--kv-cache", choices=KV_CACHE_DTYPES, help="KV cache dtype (default: the weights dtype)"
    )
    p.add_argument(
        "--prefill-chunk", type=int, help="tokens per prefill chunk: count its activations per device (default: none)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    try:
        # Everything the arguments alone decide is checked before the rules (and JAX) are imported.
        cfg, name = _load_config(args)
        if args.dtype:
            cfg = cfg.replace(dtype=args.dtype)
        if args.quantize:
            cfg = cfg.replace(quant=args.quantize, group_size=args.group_size)
        parse_mesh_spec(args.mesh, args.devices)
        _check_settings(args.device, args.headroom)
        if args.prefill_chunk is not None and args.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .rules import ShardingError

    try:
        plan = plan_memory(
            cfg,
            args.mesh,
            batch=args.batch,
            max_len=args.max_len,
            device=args.device,
            device_memory=None if args.device_memory is None else int(args.device_memory * GiB),
            headroom=args.headroom,
            n_devices=args.devices,
            cache_dtype=args.cache_dtype,
            name=name,
            prefill_chunk=args.prefill_chunk,
        )
    except (ShardingError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(format_plan(plan))
    return 1 if plan.fits is False else 0


if __name__ == "__main__":
    # The planner needs no accelerator: keep JAX on the CPU so it never claims a TPU or GPU another job uses.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
