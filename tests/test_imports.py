"""The package's import graph: every edge counted, deferred imports (inside functions) and imports by string
(``importlib.import_module("…")``, ``"module:function"`` references) included, and none of them closes a cycle; the
library never imports its applications (``zebrax.app``), and importing it loads none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("zebrax", "kernels_pallas")
DYNAMIC = ("import_module", "__import__")  # calls that import by a name known only when they run


def modules() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = f
    return files


def _named(text: str, files: dict[str, Path]) -> str | None:
    """The project module a string names by its dotted path (``"zebrax.init.mla_svd"``,
    ``"zebrax.init.mla_svd:mla_from_attention"``), or None (the bare ``"zebrax"`` is also the name of a format)."""
    name = text.partition(":")[0]
    return name if name in files and ("." in name or ":" in text) else None


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports anywhere in its file: ``import a.b``, ``from a import b`` (an edge to
    ``a.b`` when that is a module, else to the package ``a``), and every string constant that names a project module
    (an import by string, which ``importlib`` or a ``"module:function"`` reference would carry out)."""
    files = modules()
    graph = {}
    for name, f in files.items():
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _named(node.value, files):
                edges.add(_named(node.value, files))
        graph[name] = edges - {name}
    return graph


def dynamic_imports() -> list[str]:
    """``file:line`` of every call that imports by a name computed when it runs (``importlib.import_module(x)``,
    ``__import__(x)``): an edge no reading of the code can see."""
    found = []
    for f in modules().values():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if called in DYNAMIC:
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_an_import_by_string_is_an_edge(tmp_path, monkeypatch):
    """A module that names another in a string (``"module:function"``, ``import_module("…")``) has an edge to it."""
    package = tmp_path / "zebrax"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text('TARGET = "zebrax.b:run"\n')
    (package / "b.py").write_text("import importlib\nX = importlib.import_module('zebrax.a')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph()
    assert graph["zebrax.a"] == {"zebrax.b"} and graph["zebrax.b"] == {"zebrax.a"}
    assert cycles(graph) == [["zebrax.a", "zebrax.b"]]
    assert dynamic_imports() == ["zebrax/b.py:2"]


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert {"zebrax.app.cli", "zebrax.app.job", "zebrax.ops.attention", "zebrax.sharding", "zebrax.mixers",
            "zebrax.mixers.gdn.kind"} <= set(graph)
    assert cycles(graph) == []


def test_nothing_imports_by_a_name_computed_at_run_time():
    assert dynamic_imports() == []


def test_the_library_never_imports_the_applications():
    """No module outside ``zebrax.app`` imports one inside it, but the package's face (``zebrax/__init__.py``), whose
    ``describe`` and ``compile`` import theirs when first called, and ``python -m zebrax`` (``__main__.py``)."""
    graph = import_graph()
    library = {m for m in graph if not m.startswith("zebrax.app") and m not in ("zebrax", "zebrax.__main__")}
    reaching = {m: sorted(e for e in graph[m] if e.startswith("zebrax.app")) for m in library}
    assert {m: e for m, e in reaching.items() if e} == {}


# below → what it may never reach, through any chain of imports: data flows one way
NEVER = {
    "kernels_pallas": ("zebrax",),
    "zebrax.checks": ("zebrax.mixers", "zebrax.config", "zebrax.models"),
    "zebrax.ops": ("zebrax.mixers", "zebrax.config", "zebrax.models", "zebrax.layers"),
    "zebrax.layers": ("zebrax.mixers", "zebrax.config", "zebrax.models"),
    "zebrax.cache": ("zebrax.mixers", "zebrax.config", "zebrax.models"),
    "zebrax.mixers": ("zebrax.config", "zebrax.models", "zebrax.recipe", "zebrax.init", "zebrax.api"),
    "zebrax.config": ("zebrax.models", "zebrax.recipe", "zebrax.init", "zebrax.api", "zebrax.checkpoint"),
    "zebrax.losses": ("zebrax.models", "zebrax.distill"),
    "zebrax.hosts": ("zebrax.sharding", "zebrax.models", "zebrax.mixers"),
    "zebrax.files": ("zebrax.checkpoint", "zebrax.sharding", "zebrax.models", "zebrax.mixers"),
    "zebrax.convert": ("zebrax.distill", "zebrax.api"),
    "zebrax.api": ("zebrax.distill",),
}


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_data_flows_one_way():
    """No module of a lower floor reaches one of the floors above it (``NEVER``): a kind's folder never reaches the
    configs that list the kinds, the files never reach the checkpoint format or the mesh, …"""
    graph = import_graph()
    broken = {}
    for below, above in NEVER.items():
        for module in (m for m in graph if m == below or m.startswith(below + ".")):
            bad = sorted(m for m in reached(graph, module) if any(m == a or m.startswith(a + ".") for a in above))
            if bad:
                broken[module] = bad
    assert broken == {}


def test_importing_the_library_loads_no_application():
    """``import zebrax``, its configs, a model, the distillation pipeline: no module of ``zebrax.app`` is loaded."""
    code = ("import sys, zebrax, zebrax.config, zebrax.api, zebrax.distill.pipeline\n"
            "print(sorted(m for m in sys.modules if m.startswith('zebrax.app')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
