"""Logical axis names -> mesh axes: one rules table for every strategy, and the shardings it gives.

Every parameter and cache field names its dims with logical axes (`nnx.Param(..., axes=...)` in
glm4_jax/model.py, `KVCache.AXES`). `RULES` maps each logical axis to a tuple of mesh axes. A mesh axis of size 1
does nothing, so the mesh sizes pick the strategy from the one table:

    tensor=8                 Megatron-style tensor parallelism: heads, ffn and vocab split 8 ways
    fsdp=8                   weights split on their model (embed) dim, gathered by XLA where used; batch split
    data=2,fsdp=2,tensor=2   all three at once
    sequence=8               context parallelism: the hidden states split along T, the KV cache along its
                             slots (long contexts); weights replicated
    tensor=2,sequence=8      ... and the weights split 2 ways

Resolving one array: for each dim, the mesh axes of its rule are taken in order, skipping axes of size 1. An
axis whose size (times the axes already taken for that dim) does not divide the dim is an error
(`ShardingError`), unless the rule marks it optional with a trailing "?": then that axis is skipped and the dim is
replicated over it. Only small or per-request arrays are optional: the kv heads (2 or 4 in GLM-4, fewer than a
typical tensor axis; the k/v projections are 6% of the attention weights, 11% in the 1M model) and the batch on
`fsdp` (a batch of 1 on an fsdp mesh). Big weights (vocab, embed, q heads, ffn) never replicate silently. No mesh
axis may serve two dims of one array: `check_axes` enforces it for every array, whatever the mesh sizes.

This module knows nothing of the model (the model may import `constrain` from it); `shardings.py` applies the
rules to the parameter tree and the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .mesh import MESH_AXES

Rules = Mapping[str, Sequence[str]]

# logical axis -> mesh axes, in the order they split the dim; "axis?" = replicate over it when it cannot divide.
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),  # embed [V, D], lm_head [D, V], and the logits
    "embed": ("fsdp",),  # the model dim D of every matrix (FSDP / ZeRO-3 style)
    "q_heads": ("tensor",),  # q, o, q_bias
    "kv_heads": ("tensor?",),  # k, v, k_bias, v_bias and the cache: 2 or 4 heads, replicated when tensor > heads
    # the kv groups of the fused qkv (its query heads and a copy of their kv head; Config.model_layout): as many
    # as the tensor axis needs (config.kv_copies), so they always divide it
    "kv_groups": ("tensor",),
    "ffn": ("tensor",),  # gate, up, down
    "head_dim": (),
    "layers": (),  # the scan axis
    "norm": (),  # RMSNorm weights: tiny
    # KV cache and activations
    "batch": ("data", "fsdp?"),
    "cache_seq": ("sequence",),
    # the tokens of the hidden states [B, T, D] (context parallelism): split along T by `sequence` from the
    # embedding to the final norm; replicated when T does not divide (a decode step's single token)
    "act_seq": ("sequence?",),
}

# Einsum letters of the logical axes (glm4_jax/model.py), for error messages.
LETTERS = {
    "layers": "L",
    "batch": "B",
    "cache_seq": "S",
    "act_seq": "T",
    "embed": "D",
    "norm": "D",
    "q_heads": "N",
    "kv_heads": "K",
    "kv_groups": "J",
    "head_dim": "H",
    "ffn": "F",
    "vocab": "V",
}

# Activations passed in and out of `jit_forward`; None = never sharded.
TOKENS_AXES = ("batch", None)  # tokens, positions [B, T]
LOGITS_AXES = ("batch", None, "vocab")  # [B, T, V]
HIDDEN_AXES = ("batch", "act_seq", None)  # the hidden states [B, T, D] inside the model


class ShardingError(ValueError):
    """An array that the rules cannot place on the mesh (a size that does not divide, a bad rules table)."""


# ---- one array ------------------------------------------------------------------------------------------------


def _axis(entry: str) -> tuple[str, bool]:
    """'fsdp?' -> ('fsdp', True)."""
    return (entry[:-1], True) if entry.endswith("?") else (entry, False)


def _describe(name: str, axes: Sequence[str | None]) -> str:
    return f"{name} [{', '.join(LETTERS.get(a, a) if a else '-' for a in axes)}]"


def check_axes(axes: Sequence[str | None], rules: Rules, name: str = "array") -> None:
    """Raises ShardingError when a logical axis has no rule or two dims of one array map to the same mesh axis."""
    owner: dict[str, str] = {}
    for logical in axes:
        if logical is None:
            continue
        if logical not in rules:
            raise ShardingError(f"no sharding rule for logical axis {logical!r} of {_describe(name, axes)}")
        for entry in rules[logical]:
            mesh_axis, _ = _axis(entry)
            if mesh_axis in owner:
                raise ShardingError(
                    f"mesh axis {mesh_axis!r} would shard two dims ({owner[mesh_axis]} and {logical}) of "
                    f"{_describe(name, axes)}; fix the rules table"
                )
            owner[mesh_axis] = logical


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Rules | None = None,
    name: str = "array",
) -> P:
    """The PartitionSpec of an array of `shape` whose dims have the logical `axes` (see the module docstring)."""
    rules = RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: {len(axes)} logical axes {tuple(axes)} for a shape of rank {len(shape)}")
    check_axes(axes, rules, name)
    sizes = dict(mesh.shape)
    spec = []
    for logical, dim in zip(axes, shape, strict=True):
        taken: list[str] = []
        for entry in rules[logical] if logical is not None else ():
            mesh_axis, optional = _axis(entry)
            if mesh_axis not in sizes and mesh_axis not in MESH_AXES:
                raise ShardingError(f"the rule for {logical!r} names {mesh_axis!r}, which is not a mesh axis")
            n = sizes.get(mesh_axis, 1)
            if n == 1:
                continue  # a mesh axis of size 1 does nothing
            split = math.prod(sizes[a] for a in taken) * n
            if dim % split == 0:
                taken.append(mesh_axis)
            elif not optional:
                what = "*".join(taken + [mesh_axis])
                raise ShardingError(
                    f"{what}={split} does not divide {logical}={dim} of {_describe(name, axes)}; "
                    f"choose mesh sizes that divide {dim}"
                )
        spec.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
    return P(*spec)


def named_sharding(
    mesh: Mesh | AbstractMesh,
    axes: Sequence[str | None],
    shape: Sequence[int],
    rules: Rules | None = None,
    name="array",
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules, name))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None, name: str = "activation"):
    """`jax.lax.with_sharding_constraint` by logical axes, on the ambient mesh (`jax.set_mesh`; `jit_forward`
    traces under its mesh). Without an ambient mesh it returns x unchanged, so model code may call it freely."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules, name))
