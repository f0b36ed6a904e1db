"""Imports point one way: library -> networks and converters -> experiment -> commands.

Read from the source (AST), so a lazy import inside a function counts as well:

0. the library: ``adj_quant`` without its two subpackages below;
1. the network declarations and the weight converters: ``slim_nets``, ``pretrained``
   (the library may reach them only from inside a function, never at module level);
2. the experiment: ``adj_quant.recipe`` (the recipe, its data, sweeps, the Pareto plot);
3. the commands: ``adj_quant.cli``.

A module may import its own layer and the layers below it. Separately, the module-level
imports between the project's modules must form no cycle.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("adj_quant", "slim_nets", "pretrained")
LAYER_NAMES = ("library", "networks and converters", "experiment", "commands")


def layer(module: str) -> int | None:
    """The layer of a project module (None: not the project's)."""
    top = module.split(".")[0]
    if module == "adj_quant.cli" or module.startswith("adj_quant.cli."):
        return 3
    if module == "adj_quant.recipe" or module.startswith("adj_quant.recipe."):
        return 2
    if top in ("slim_nets", "pretrained"):
        return 1
    if top == "adj_quant":
        return 0
    return None


def project_modules() -> dict[str, str]:
    """``{dotted module name: path}`` of every Python file of the three packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def imports(module: str, path: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    # An import under `if TYPE_CHECKING:` or `try:` at the top is still module level.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module.
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            found.append((name, node.lineno, id(node) in top_level))
    return found


def resolve(name: str, modules: dict[str, str]) -> str | None:
    """The project module an import names (the longest known prefix), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def violations(modules: dict[str, str]) -> list[str]:
    bad = []
    for module, path in sorted(modules.items()):
        own = layer(module)
        seen = set()
        for name, line, at_top in imports(module, path):
            target = resolve(name, modules)
            if target is None or line in seen:
                continue
            theirs = layer(target)
            where = f"{os.path.relpath(path, ROOT)}:{line} imports {target}"
            if theirs > own and not (own == 0 and theirs == 1 and not at_top):
                bad.append(f"{where}: the {LAYER_NAMES[own]} must not import the "
                           f"{LAYER_NAMES[theirs]}")
                seen.add(line)  # one report per import statement
            elif own == 0 and theirs == 1 and at_top:
                bad.append(f"{where} at module level: the library reaches slim_nets and "
                           "pretrained only inside a function")
                seen.add(line)
    return bad


def cycles(modules: dict[str, str]) -> list[list[str]]:
    """Cycles of the module-level import graph (a package's ``__init__`` included)."""
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _, at_top in imports(module, path):
            target = resolve(name, modules)
            if at_top and target is not None and target != module:
                graph[module].add(target)
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_layer_of_each_package():
    assert layer("adj_quant.network") == 0 and layer("adj_quant") == 0
    assert layer("slim_nets.efficientnet_b0") == 1 and layer("pretrained.convert") == 1
    assert layer("adj_quant.recipe.stages") == 2 and layer("adj_quant.recipe") == 2
    assert layer("adj_quant.cli.train") == 3 and layer("adj_quant.cli") == 3
    assert layer("tensorflow") is None and layer("adj_quantx") is None


def test_the_scanner_sees_every_kind_of_import(tmp_path):
    """The checks can fail: a planted module with a wrong import is reported."""
    folder = tmp_path / "adj_quant" / "recipe"
    folder.mkdir(parents=True)
    (tmp_path / "adj_quant" / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (tmp_path / "adj_quant" / "lib.py").write_text(
        "def f():\n    from .recipe import stages\n")
    (tmp_path / "adj_quant" / "top.py").write_text("import adj_quant.lib as lib\n")
    (folder / "stages.py").write_text("from adj_quant import top\nimport adj_quant.recipe\n")
    modules = {"adj_quant": str(tmp_path / "adj_quant" / "__init__.py"),
               "adj_quant.lib": str(tmp_path / "adj_quant" / "lib.py"),
               "adj_quant.top": str(tmp_path / "adj_quant" / "top.py"),
               "adj_quant.recipe": str(folder / "__init__.py"),
               "adj_quant.recipe.stages": str(folder / "stages.py")}
    found = violations(modules)
    assert len(found) == 1 and "lib.py:2 imports adj_quant.recipe.stages" in found[0]
    (tmp_path / "adj_quant" / "lib.py").write_text("import adj_quant.top\n")
    assert cycles(modules) == [["adj_quant.lib", "adj_quant.top", "adj_quant.lib"]]


def test_imports_point_one_way():
    modules = project_modules()
    assert {"adj_quant.network", "adj_quant.recipe.stages", "adj_quant.cli.train",
            "slim_nets.efficientnet_b0", "pretrained.convert"} <= set(modules)
    bad = violations(modules)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(project_modules())
    assert not found, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
