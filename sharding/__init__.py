"""Device meshes, logical-axis sharding rules and the memory planner (docs/SHARDING.md).

A leaf of the package: it knows mesh axes and logical axis names, never model code (tests/test_layers.py checks
it). Placing a model on a mesh (`shard_model`, `param_shardings`, `jit_forward`, ...) is in `glm4_jax.placement`,
also importable from the top level:

    import glm4_jax
    from glm4_jax.sharding import make_mesh
    mesh = make_mesh("tensor=4,sequence=2")
    glm4_jax.shard_model(model, mesh)

The planner (`glm4_jax.sharding.plan`, also `python -m glm4_jax.sharding.plan`) is imported on first use.
"""

from .mesh import (
    MESH_AXES,
    abstract_mesh,
    initialize_distributed,
    make_mesh,
    mesh_sizes,
    mesh_str,
    parse_mesh_spec,
    tpu_vm_host_count,
)
from .rules import (
    LOGITS_AXES,
    RULES,
    TOKENS_AXES,
    ShardingError,
    check_axes,
    constrain,
    logical_to_spec,
    named_sharding,
)

__all__ = [
    "DEVICES",
    "LOGITS_AXES",
    "MESH_AXES",
    "RULES",
    "TOKENS_AXES",
    "MemoryPlan",
    "ShardingError",
    "abstract_mesh",
    "check_axes",
    "constrain",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "mesh_sizes",
    "mesh_str",
    "named_sharding",
    "parse_mesh_spec",
    "plan_memory",
    "tpu_vm_host_count",
]


def __getattr__(name):
    # Lazy, so that `python -m glm4_jax.sharding.plan` does not import the module twice.
    if name in ("plan_memory", "MemoryPlan", "DEVICES"):
        from glm4_jax.sharding import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'glm4_jax.sharding' has no attribute {name!r}")
