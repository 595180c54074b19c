"""The module map of docs/DESIGN.md: every import arrow points one way.

The graph is read from the source (every `import` and `from ... import`, also those inside functions), with the
folders mapped to their installed names (convert/ -> glm4_jax.convert, sharding/ -> glm4_jax.sharding). An edge
a -> b means module a imports module b. Importing a submodule from outside its package also runs the package's
__init__, so it is an edge to the package too (model -> glm4_jax.sharding.rules is also model -> glm4_jax.sharding).
"""

from __future__ import annotations

import ast
import pathlib

from conftest import REPO

PACKAGES = {"glm4_jax": "glm4_jax", "glm4_jax.convert": "convert", "glm4_jax.sharding": "sharding"}

# Layers, lowest first: a module may import only from its own layer or below. Listed so that a new module must
# be placed on purpose (the test fails for a module that is in no layer).
LAYERS = [
    {"glm4_jax", "glm4_jax.runtime", "glm4_jax.paths", "glm4_jax.config", "glm4_jax.options", "glm4_jax.toolcalls"},
    {"glm4_jax.sharding", "glm4_jax.sharding.mesh", "glm4_jax.sharding.rules", "glm4_jax.sharding.plan"},
    {"glm4_jax.kernels", "glm4_jax.ring", "glm4_jax.attention", "glm4_jax.sampling", "glm4_jax.fileio"},
    {"glm4_jax.qmatmul", "glm4_jax.qkernel", "glm4_jax.quant"},
    {"glm4_jax.model", "glm4_jax.tokenizer", "glm4_jax.chat0414", "glm4_jax.tokenizer_json"},
    {"glm4_jax.placement", "glm4_jax.checkpoint"},
    {"glm4_jax.convert", "glm4_jax.convert.readers", "glm4_jax.convert.table", "glm4_jax.convert.pipeline"},
    {"glm4_jax.engine"},
    {"glm4_jax.batching"},
    {"glm4_jax.api"},
    {
        "glm4_jax.fixtures",
        "glm4_jax.convert.__main__",
        "glm4_jax.check",
        "glm4_jax.generate",
        "glm4_jax.bench",
        "glm4_jax.demo",
        "glm4_jax.serve",
    },
]

# What each group may never import, whatever its layer (the rules of the issue that set the map).
MODEL_CODE = {
    "glm4_jax.model",
    "glm4_jax.attention",
    "glm4_jax.kernels",
    "glm4_jax.ring",
    "glm4_jax.qmatmul",
    "glm4_jax.qkernel",
    "glm4_jax.placement",
}
CLI = {
    "glm4_jax.generate",
    "glm4_jax.bench",
    "glm4_jax.demo",
    "glm4_jax.convert.__main__",
    "glm4_jax.serve",
    "glm4_jax.check",
}


def _module_files() -> dict[str, pathlib.Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[name] = path
    return files


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a `from X import ...` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the first-party modules it imports, and module -> the top-level names of all it imports."""
    files = _module_files()
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.stem == "__init__"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            edges[name].update(targets)
            for target in targets:  # the packages a submodule import runs, seen from outside them
                parts = target.split(".")
                for i in range(1, len(parts)):
                    package = ".".join(parts[:i])
                    if package in PACKAGES and not (name == package or name.startswith(package + ".")):
                        edges[name].add(package)
    return edges


def _first_party(edges):
    files = set(edges)
    return {a: {b for b in bs if b in files and b != a} for a, bs in edges.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _first_party(import_graph())
    n_edges = sum(len(v) for v in graph.values())
    cycles = _cycles(graph)
    print(f"{len(graph)} modules, {n_edges} first-party import edges, {len(cycles)} circles")
    assert not cycles, f"import circles: {cycles}"


def test_every_module_is_on_a_layer_and_imports_only_downwards():
    graph = _first_party(import_graph())
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    unplaced = sorted(set(graph) - set(layer_of))
    assert not unplaced, f"modules on no layer of tests/test_layers.py: {unplaced}"
    upward = [(a, b) for a, bs in graph.items() for b in bs if layer_of[b] > layer_of[a]]
    assert not upward, f"imports pointing up the layers: {upward}"


def test_the_rules_of_the_map():
    edges = import_graph()
    graph = _first_party(edges)
    # sharding/ knows mesh axes and logical axis names: no model, generation, API or checkpoint code.
    for name in (m for m in graph if m.startswith("glm4_jax.sharding")):
        allowed = {m for m in graph if m.startswith("glm4_jax.sharding")} | {"glm4_jax.config"}
        assert graph[name] <= allowed, f"{name} imports {sorted(graph[name] - allowed)}"
    # The model needs no tokenizer, converter, checkpoint, engine, API or CLI.
    for name in ("glm4_jax.model", "glm4_jax.attention", "glm4_jax.kernels", "glm4_jax.ring"):
        bad = {
            m
            for m in graph[name]
            if m not in MODEL_CODE and m not in LAYERS[0] and not m.startswith("glm4_jax.sharding")
        }
        assert not bad, f"{name} imports {sorted(bad)}"
    # Only the checkpoint module talks to Orbax.
    orbax = sorted(m for m, bs in edges.items() if any(b == "orbax" or b.startswith("orbax.") for b in bs))
    assert orbax == ["glm4_jax.checkpoint"], orbax
    # No library module imports a command-line module.
    for name, deps in graph.items():
        if name not in CLI and name != "glm4_jax.fixtures":
            assert not deps & CLI, f"{name} imports the CLI modules {sorted(deps & CLI)}"
