"""The shape of the code: lowbit's import graph has no cycles, and no module uses another module's private names.

Read from the source with `ast`, nothing is imported. Every import counts, those inside functions too: a lazy
import hides a cycle from the interpreter, not from the design. A package importing its own submodules (the
re-exports of an `__init__.py`) is not an edge of concern. Private means one leading underscore (not dunder),
whether the name is imported (`from m import _x`, `import m._x`) or reached as an attribute of an imported
module (`m._x`). The benchmarks may use only lowbit's public names too.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_table(package: Path) -> dict[str, Path]:
    """Dotted name of every module of a package -> its file; a package is named by its `__init__.py`."""
    table = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        table[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return table


@dataclass
class Imports:
    """What the modules of a source tree import from one package: edges with their first line, private uses."""
    edges: dict[str, dict[str, str]] = field(default_factory=dict)   # importer -> {imported module: "file:line"}
    private: list[str] = field(default_factory=list)


def scan(files: dict[str, Path], modules: dict[str, Path], imports: Imports, root: Path) -> None:
    """Record into `imports` what each of `files` (dotted name -> path) imports from the modules in `modules`.
    Relative imports resolve against the importer's own name, so `files` and `modules` may be the same table."""
    top = next(iter(modules)).split(".")[0]

    def within(name: str) -> bool:
        return name == top or name.startswith(top + ".")

    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = imports.edges.setdefault(name, {})
        bound: dict[str, str] = {}   # local name -> the lowbit module it stands for

        def note(node: ast.AST, target: str, what: str = "", owner: str | None = None) -> None:
            """An import of `target` here; `what`, if private, is a name of `owner` (default: `target`) used here."""
            if target == name:
                return
            where = f"{path.relative_to(root)}:{node.lineno}"
            edges.setdefault(target, where)
            if is_private(what):
                imports.private.append(f"{name} uses {what} of {owner or target} ({where})")

        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not within(alias.name):
                        continue
                    parts = alias.name.split(".")
                    # `import a.b._c`: the first private part names a private module of the package before it
                    first = next((i for i, part in enumerate(parts) if is_private(part)), None)
                    note(node, alias.name if first is None else ".".join(parts[:first]),
                         "" if first is None else parts[first])
                    bound[alias.asname or parts[0]] = alias.name if alias.asname else parts[0]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not within(source):
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:   # `from package import module`: the edge goes to that module
                        note(node, sub, alias.name, owner=source)
                        bound[alias.asname or alias.name] = sub
                    else:
                        note(node, source, alias.name)
        # `m._x` where m stands for a lowbit module, `lowbit.a.b._x` after `import lowbit.a.b` included
        inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue
            chain, value = [], node
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                module = bound[value.id]
                while chain and f"{module}.{chain[0]}" in modules:
                    module = f"{module}.{chain.pop(0)}"
                if chain and is_private(chain[0]):
                    note(node, module, chain[0])


def package_imports(package: Path, root: Path) -> Imports:
    """The imports among the modules of a package; a package's imports of its own subtree are left out."""
    modules = module_table(package)
    imports = Imports()
    scan(modules, modules, imports, root)
    for name, edges in imports.edges.items():
        if modules[name].name == "__init__.py":
            imports.edges[name] = {t: w for t, w in edges.items() if not t.startswith(name + ".")}
    return imports


def cycles(edges: dict[str, dict[str, str]]) -> list[str]:
    """Each strongly connected group of modules (Tarjan), reported as its shortest cycle through its first
    module, `a -> b -> a`, with where each of those imports is."""
    index, low, stack, groups = {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        parent, queue, path = {start: None}, [start], None
        for v in queue:   # breadth first, inside the group, until an edge closes the loop back to the start
            if start in edges[v]:
                path = [start]
                while v is not None:
                    path.insert(0, v)
                    v = parent[v]
                break
            for w in sorted(edges[v]):
                if w in group and w not in parent:
                    parent[w] = v
                    queue.append(w)
        steps = "; ".join(f"{a} -> {b} at {edges[a][b]}" for a, b in zip(path, path[1:]))
        others = sorted(group - set(path))
        also = f" (its group also holds {', '.join(others)})" if others else ""
        found.append(" -> ".join(path) + ": " + steps + also)
    return sorted(found)


PACKAGE = ROOT / "src" / "lowbit"


def test_lowbit_import_graph_has_no_cycles():
    found = cycles(package_imports(PACKAGE, ROOT).edges)
    if found:
        pytest.fail("import cycles in lowbit:\n" + "\n".join(found), pytrace=False)


def test_lowbit_modules_use_no_private_names_of_other_modules():
    private = package_imports(PACKAGE, ROOT).private
    if private:
        pytest.fail("private names used across lowbit modules:\n" + "\n".join(private), pytrace=False)


def test_benchmarks_use_no_private_lowbit_names():
    imports = Imports()
    scan({p.stem: p for p in sorted((ROOT / "benchmarks").glob("*.py"))}, module_table(PACKAGE), imports, ROOT)
    if imports.private:
        pytest.fail("private lowbit names used by benchmarks:\n" + "\n".join(imports.private), pytrace=False)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


def test_the_checks_find_cycles_and_private_uses(tmp_path):
    """The checks above pass only if they can fail: a small package with known faults, each found and named."""
    write_tree(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom . import b, sub\n",         # re-exports: no cycle through pkg
        "pkg/a.py": "from .b import g\ndef f(): pass\n",
        "pkg/b.py": "def g():\n    from .a import f\nfrom pkg.c import _hidden, h\n",   # lazy, still a cycle
        "pkg/c.py": "from .sub.inner import k\n_hidden = 1\ndef h(): pass\n",
        "pkg/d.py": "import pkg.c as c\nx = c._hidden + c.h.__name__.__len__()\n",
        "pkg/sub/__init__.py": "from . import inner\n",
        "pkg/sub/inner.py": "from .. import d\nimport pkg._private_mod\ndef k(): pass\n",
        "pkg/_private_mod.py": "",
        "pkg/e.py": "from .c import h\n",                                  # public use: fine
        "bench/run.py": "import pkg.sub\nfrom pkg import a\ny = pkg.sub.inner._z + a._w + a.f()\n",
    })
    imports = package_imports(tmp_path / "pkg", tmp_path)
    assert cycles(imports.edges) == [
        "pkg.a -> pkg.b -> pkg.a: pkg.a -> pkg.b at pkg/a.py:1; pkg.b -> pkg.a at pkg/b.py:2",
        "pkg.c -> pkg.sub.inner -> pkg.d -> pkg.c: pkg.c -> pkg.sub.inner at pkg/c.py:1; "
        "pkg.sub.inner -> pkg.d at pkg/sub/inner.py:1; pkg.d -> pkg.c at pkg/d.py:1",
    ]
    assert sorted(imports.private) == [
        "pkg.b uses _hidden of pkg.c (pkg/b.py:3)",
        "pkg.d uses _hidden of pkg.c (pkg/d.py:2)",
        "pkg.sub.inner uses _private_mod of pkg (pkg/sub/inner.py:2)",
    ]
    bench = Imports()
    scan({"run": tmp_path / "bench" / "run.py"}, module_table(tmp_path / "pkg"), bench, tmp_path)
    assert sorted(bench.private) == ["run uses _w of pkg.a (bench/run.py:3)",
                                     "run uses _z of pkg.sub.inner (bench/run.py:3)"]
