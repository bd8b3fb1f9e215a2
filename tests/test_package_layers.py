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
    seen = {t for t, _, _ in _imports("mamlpp_ext.model.backends")}
    assert {"mamlpp_ext.ops", "mamlpp_ext.ops.reference"} <= seen
    assert "mamlpp_ext.model.network" in {t for t, _, _ in _imports("mamlpp_ext.model.meta_learner")}
    assert _layer("mamlpp_ext.training.trainer") == "training" and len(MODULES) > 25


def _private_attributes(module: str) -> tuple[set[str], list[tuple[str, int]]]:
    """(private names ``module`` defines — functions, classes, methods, attributes it assigns —,
    (name, line) of every private attribute it reads as ``something._name``)."""
    tree = ast.parse(MODULES[module].read_text())
    defined, used = set(), []
    external = set()  # names bound to other libraries' modules and objects (torch._check is torch's)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("mamlpp_ext")}
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("mamlpp_ext"):
            external |= {a.asname or a.name for a in node.names}

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    def root(node: ast.AST) -> ast.AST:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and private(node.name):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and private(sub.attr):
                        defined.add(sub.attr)
                    elif isinstance(sub, ast.Name) and private(sub.id):
                        defined.add(sub.id)
        elif isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.ctx, ast.Load):
            base = root(node.value)
            if not (isinstance(base, ast.Name) and base.id in external):
                used.append((node.attr, node.lineno))
    return defined, used


def test_no_private_attributes_across_modules():
    """A module reads no private attribute (``obj._name``) that another module of the package
    defines: modules talk through public interfaces (e.g. graph mode uses the learner's public
    ``step``). Private names of torch and other libraries are not checked here."""
    info = {m: _private_attributes(m) for m in MODULES}
    defined_by: dict[str, set[str]] = {}
    for m, (defined, _) in info.items():
        for name in defined:
            defined_by.setdefault(name, set()).add(m)
    bad = []
    for m, (defined, used) in info.items():
        for name, line in used:
            if name not in defined and name in defined_by:
                bad.append(f"{m}:{line} reads {name}, defined in {sorted(defined_by[name])}")
    assert not bad, "private attributes used across modules:\n" + "\n".join(bad)


def test_the_attribute_checker_sees_private_reads():
    defined, used = _private_attributes("mamlpp_ext.model.graph")
    assert "_learner" in defined and any(name == "_copy_in" for name, _ in used)
    _, used = _private_attributes("mamlpp_ext.ops.task_conv")  # torch._check: another library's
    assert not any(name == "_check" for name, _ in used)
