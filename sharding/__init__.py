"""Device meshes, logical-axis sharding rules and the memory planner (docs/SHARDING.md).

A leaf of the package: it knows mesh axes and logical axis names, never model code (tests/test_layers.py checks
it). Placing a model on a mesh (`shard_model`, `param_shardings`, `jit_forward`, ...) is in `glm4_jax.placement`,
also importable from the top level:

    import glm4_jax
    from glm4_jax.sharding import make_mesh
    mesh = make_mesh("tensor=4,sequence=2")
    glm4_jax.shard_model(model, mesh)

The rules and the planner (`glm4_jax.sharding.plan`, also `python -m glm4_jax.sharding.plan`) are imported on
first use, so that importing the package does not start JAX.
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


_LAZY = {
    **dict.fromkeys(
        (
            "LOGITS_AXES",
            "RULES",
            "TOKENS_AXES",
            "ShardingError",
            "check_axes",
            "constrain",
            "logical_to_spec",
            "named_sharding",
        ),
        "glm4_jax.sharding.rules",
    ),
    **dict.fromkeys(("plan_memory", "MemoryPlan", "DEVICES"), "glm4_jax.sharding.plan"),
}


def __getattr__(name):
    # Lazy: `mesh` needs no JAX until a mesh is made, so the command lines check a --mesh spec before JAX starts;
    # the rules import JAX; and `python -m glm4_jax.sharding.plan` must not import the planner twice.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm4_jax.sharding' has no attribute {name!r}")
