"""Device meshes with the named axes `data`, `fsdp`, `sequence`, `tensor`, on one host or many.

A mesh is given as a string ("data=1,fsdp=2,tensor=4,sequence=1") or a dict; missing axes are 1, and one axis
may be -1 for "all the remaining devices". The mesh axes are laid out in `MESH_AXES` order, `tensor` last:
`jax.make_mesh` gives the last axes the most closely connected devices, and tensor parallelism talks the most
(two all-reduces per layer per token), then `sequence` (softmax statistics per layer), then `fsdp` and `data`.

Multi-host: call `initialize_distributed()` before anything touches a device; then `jax.devices()` lists the
devices of every host and `make_mesh` spans them all (see docs/SHARDING.md for the TPU-VM launch).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # JAX is imported by the functions that need it, so that CLIs can check a spec without it
    import jax
    from jax.sharding import AbstractMesh, Mesh

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

MeshSpec = str | Mapping[str, int]

_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*$")


def parse_mesh_spec(spec: MeshSpec | None, n_devices: int | None = None, *, keep_rest: bool = False) -> dict[str, int]:
    """Axis sizes from "data=1,fsdp=2,tensor=4,sequence=1" or a dict, in `MESH_AXES` order.

    Missing axes are 1. One axis may be -1: it takes the devices the others leave, which needs `n_devices` (with
    `keep_rest` and no `n_devices` the -1 stays, for checking a spec before the devices are known). When
    `n_devices` is given the sizes must multiply to it exactly. Raises ValueError with the reason otherwise.
    """
    if spec is None:
        items: dict[str, int] = {}
    elif isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            m = _ITEM.match(part)
            if not m:
                raise ValueError(f"mesh spec {spec!r}: {part.strip()!r} is not AXIS=SIZE (e.g. 'tensor=4')")
            name, size = m.group(1), int(m.group(2))
            if name in items:
                raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
            items[name] = size
    elif isinstance(spec, Mapping):
        items = {}
        for name, size in spec.items():
            if isinstance(size, bool) or not isinstance(size, int):
                raise ValueError(f"mesh spec {dict(spec)!r}: size of {name!r} must be an int, got {size!r}")
            items[str(name)] = size
    else:
        raise ValueError(f"a mesh spec is a string like 'data=1,fsdp=2,tensor=4,sequence=1' or a dict, got {spec!r}")

    for name, size in items.items():
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis {name}={size}: sizes are positive, or -1 for the remaining devices")
    sizes = {name: items.get(name, 1) for name in MESH_AXES}

    rest = [name for name, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if len(rest) > 1:
        raise ValueError(f"mesh spec {_show(sizes)}: only one axis may be -1, got {', '.join(rest)}")
    if rest:
        if n_devices is None and keep_rest:
            return sizes
        if n_devices is None:
            raise ValueError(f"mesh spec {_show(sizes)}: -1 needs the number of devices")
        if n_devices % known:
            raise ValueError(
                f"mesh spec {_show(sizes)}: the other axes ({known} devices) do not divide the {n_devices} devices"
            )
        sizes[rest[0]] = n_devices // known
    if n_devices is not None and math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh spec {_show(sizes)} has {math.prod(sizes.values())} devices but there are {n_devices}; "
            "make the sizes multiply to the device count (or use -1 for one axis)"
        )
    return sizes


def make_mesh(spec: MeshSpec | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` over `devices` (default: `jax.devices()`, every host's) with axes `MESH_AXES`.

    The axes are `AxisType.Auto`: the model code carries no sharding annotations, the parameters, cache and
    inputs come in with `NamedSharding`s and XLA propagates them through the forward pass.
    """
    import jax
    from jax.sharding import AxisType

    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(spec: MeshSpec | None, n_devices: int | None = None) -> AbstractMesh:
    """A mesh of the given sizes without devices: enough for `NamedSharding.shard_shape` (the memory planner)."""
    from jax.sharding import AbstractMesh, AxisType

    sizes = parse_mesh_spec(spec, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_sizes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """{axis: size} of a mesh (axes it lacks count as 1)."""
    return {name: int(mesh.shape.get(name, 1)) for name in MESH_AXES} | dict(mesh.shape)


def mesh_str(mesh_or_sizes: Mesh | AbstractMesh | Mapping[str, int]) -> str:
    """'data=1,fsdp=2,sequence=1,tensor=4': the spec string that rebuilds the mesh."""
    sizes = mesh_or_sizes if isinstance(mesh_or_sizes, Mapping) else mesh_sizes(mesh_or_sizes)
    return ",".join(f"{name}={size}" for name, size in sizes.items())


def _show(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{name}={size}" for name, size in sizes.items())


# ---- multi-host ---------------------------------------------------------------------------------------------


def tpu_vm_host_count(timeout_s: float = 2.0) -> int:
    """The number of hosts of the Cloud TPU slice this process runs on; 1 anywhere else.

    Reads `TPU_PROCESS_ADDRESSES` / `TPU_WORKER_HOSTNAMES` (set by GKE and some launchers), else, on a machine
    with TPU chips (`/dev/accel*` or `/dev/vfio/*`) and libtpu installed, the TPU VM's metadata entry
    `worker-network-endpoints`. Touches no JAX device, so it can run before `jax.distributed.initialize`.
    """
    for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = os.environ.get(var)
        if hosts:
            return len([h for h in hosts.split(",") if h.strip()])
    if not _has_tpu_chips():
        return 1
    import importlib.util
    import urllib.request

    if importlib.util.find_spec("libtpu") is None:
        return 1
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    url = f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints"
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            endpoints = response.read().decode()
    except OSError:
        return 1
    return max(1, len([e for e in endpoints.split(",") if e.strip()]))


def _has_tpu_chips() -> bool:
    try:
        names = os.listdir("/dev")
    except OSError:
        return False
    return any(n.startswith("accel") for n in names) or bool(os.path.isdir("/dev/vfio") and os.listdir("/dev/vfio"))


def initialize_distributed(enable: bool | None = None, **kwargs) -> bool:
    """Joins this process to a multi-host JAX cluster (`jax.distributed.initialize(**kwargs)`).

    Args:
      enable: True (the `--distributed` flag): always initialize; with no kwargs JAX detects the cluster itself
        (Cloud TPU, Slurm, Open MPI), otherwise pass `coordinator_address=`, `num_processes=`, `process_id=`.
        None (default): initialize only on a Cloud TPU VM slice with several hosts (`tpu_vm_host_count() > 1`).
        False: never.
    Returns:
      whether the distributed system is initialized when it returns. Must run before any JAX computation; a
      second call is a no-op.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    if enable is False:
        return False
    if enable is None and tpu_vm_host_count() <= 1:
        return False
    # CPU devices of different processes talk through gloo (used by the multi-process CPU tests; harmless elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
