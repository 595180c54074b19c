"""Parameter paths: the nested dicts of the model's parameters, and their '/'-joined paths ("layers/q").

Pure Python (no JAX), so the converter, the checkpoint writer and the memory planner can use it without the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def flatten(tree: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """[("layers/q", leaf), ...] for a nested dict, keys joined with '/', in sorted order."""
    out = []
    for key in sorted(tree):
        value = tree[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(flatten(value, name + "/"))
        else:
            out.append((name, value))
    return out


def unflatten(items: Iterable[tuple[str, Any]]) -> dict:
    """The nested dict of ("layers/q", leaf) pairs: the inverse of `flatten`."""
    tree: dict = {}
    for path, value in items:
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping) -> dict:
    """The nested dict of `fn(path, leaf)` for every leaf of `tree`."""
    return unflatten((path, fn(path, leaf)) for path, leaf in flatten(tree))
