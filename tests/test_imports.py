"""No import cycles inside dcp_jax: every `import` statement counts, at module level or inside a function
(an import hidden in a function still ties the two modules together), so a concept that lives in the wrong
module shows up here as a cycle instead of as a lazy import."""

import ast
from pathlib import Path

import dcp_jax

PACKAGE = Path(dcp_jax.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (absolute or relative, any nesting level)."""
    modules = module_names(root)
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:  # `from pkg import mod` imports the module, `from mod import f` the module
                    target = f"{base}.{alias.name}"
                    deps.add(target if target in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_checker_finds_a_cycle_hidden_in_a_function_and_a_relative_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("from .c import something\n")
    (pkg / "e.py").write_text("import pkg.a\n")  # imports into a cycle, is not part of one
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]


def test_dcp_jax_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "dcp_jax.models.build" in graph["dcp_jax.train"]  # the real tree was read
    assert cycles(graph) == []
