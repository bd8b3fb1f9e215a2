"""The package's layers, read from its source: imports point down only (training → model → ops;
data beside model, used by training), no import cycle between modules, no private name or
private module imported from another package.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mamlpp_ext"

# Which layers each layer may import (the package root re-exports from all of them).
ALLOWED = {
    "ops": {"ops"},
    "model": {"model", "ops"},
    "data": {"data"},
    "training": {"training", "model", "data", "ops"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _imports(module: str):
    """(imported module, imported name or None, line) for every import of mamlpp_ext code in
    ``module``, at any depth (function-level imports count too)."""
    tree = ast.parse(MODULES[module].read_text())
    pkg = _package_of(module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mamlpp_ext"):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mamlpp_ext"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES or a.name == "_C":  # a submodule (or the compiled extension)
                    yield sub, None, node.lineno
                else:
                    yield target, a.name, node.lineno


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_imports_point_down_the_layers():
    bad = []
    for module in MODULES:
        src = _layer(module)
        if src is None:
            continue
        for target, _, line in _imports(module):
            dst = _layer(target)
            if target == "mamlpp_ext._C":
                dst = "ops"  # only the ops layer loads the extension
            if dst is None or dst not in ALLOWED[src]:
                bad.append(f"{module}:{line} ({src}) imports {target} ({dst or 'package root'})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ re-exporting its own submodules is not a cycle of dependence
    for m in graph:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_packages():
    bad = []
    for module in MODULES:
        pkg = _package_of(module)
        for target, name, line in _imports(module):
            if target == "mamlpp_ext._C":
                continue
            target_pkg = target if target in MODULES and MODULES[target].name == "__init__.py" \
                else target.rsplit(".", 1)[0]
            private_module = any(p.startswith("_") for p in target.split(".")[1:])
            if private_module and target_pkg != pkg:
                bad.append(f"{module}:{line} imports private module {target}")
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{module}:{line} imports private name {name} from {target}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports():
    """The checks above must not pass by seeing nothing."""
    seen = {t for t, _, _ in _imports("mamlpp_ext.model.meta_learner")}
    assert {"mamlpp_ext.ops", "mamlpp_ext.ops.reference", "mamlpp_ext.model.network"} <= seen
    assert _layer("mamlpp_ext.training.trainer") == "training" and len(MODULES) > 25
