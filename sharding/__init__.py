"""Device meshes, logical-axis sharding rules and the memory planner (docs/SHARDING.md).

    from glm4_jax.sharding import make_mesh, shard_model, jit_forward
    mesh = make_mesh("tensor=4,sequence=2")
    shard_model(model, mesh)

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
from .shardings import (
    abstract_cache,
    abstract_params,
    abstract_sharded_cache,
    cache_shardings,
    global_input,
    init_cache,
    init_sharded_model,
    jit_forward,
    param_shardings,
    param_tree,
    shard_model,
)

__all__ = [
    "DEVICES",
    "LOGITS_AXES",
    "MESH_AXES",
    "RULES",
    "TOKENS_AXES",
    "MemoryPlan",
    "ShardingError",
    "abstract_cache",
    "abstract_mesh",
    "abstract_params",
    "abstract_sharded_cache",
    "cache_shardings",
    "check_axes",
    "constrain",
    "init_cache",
    "global_input",
    "init_sharded_model",
    "initialize_distributed",
    "jit_forward",
    "logical_to_spec",
    "make_mesh",
    "mesh_sizes",
    "mesh_str",
    "named_sharding",
    "param_shardings",
    "param_tree",
    "parse_mesh_spec",
    "plan_memory",
    "shard_model",
    "tpu_vm_host_count",
]


def __getattr__(name):
    # Lazy, so that `python -m glm4_jax.sharding.plan` does not import the module twice.
    if name in ("plan_memory", "MemoryPlan", "DEVICES"):
        from glm4_jax.sharding import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'glm4_jax.sharding' has no attribute {name!r}")
