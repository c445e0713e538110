"""The package layout: data flows down the tree (finetune/__init__.py lists the order), and no import cycles.

Every `import finetune...` is read from the source, including imports inside functions (which would
otherwise hide a cycle), and checked against the stage order.
"""
from __future__ import annotations

import ast
from pathlib import Path

import finetune

ROOT = Path(finetune.__file__).parent
# Stage order, top to bottom; a module may import its own stage and the stages before it.
ORDER = [
    {"finetune", "errors", "paths", "files", "distributed", "demo_data"},
    {"config"}, {"data"}, {"models"}, {"generate"}, {"train"}, {"merge"}, {"evaluation"}, {"export"}, {"verify"},
    {"pipeline", "cli", "__main__"},
]


def _stage(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "finetune"
    for i, names in enumerate(ORDER):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any stage of tests/test_layout.py ORDER; add it where it belongs")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> finetune modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from finetune.data import cache` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t.split(".")[0] == "finetune" and t in modules and t != name)
        graph[name] = deps
    return graph


def test_every_import_goes_up_the_stage_order():
    wrong = [f"{mod} (stage {_stage(mod)}) imports {dep} (stage {_stage(dep)})"
             for mod, deps in import_graph().items() for dep in deps if _stage(dep) > _stage(mod)]
    assert not wrong, "imports from a later stage:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = import_graph()
    # a package __init__ that re-exports its submodules is not an edge back into the package
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_function_level_import(tmp_path, monkeypatch):
    """The graph includes imports inside functions (how the old merge -> generate cycle was hidden)."""
    fake = tmp_path / "finetune"
    (fake / "models").mkdir(parents=True)
    (fake / "merge").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "merge" / "__init__.py").write_text("")
    (fake / "merge" / "stream.py").write_text("")
    (fake / "models" / "load.py").write_text("def f():\n    from finetune.merge.stream import x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake)
    graph = import_graph()
    assert graph["finetune.models.load"] == {"finetune.merge.stream"}
    assert _stage("finetune.merge.stream") > _stage("finetune.models.load")


def test_every_stage_package_says_what_it_owns_and_may_import():
    for pkg in ("config", "data", "models", "generate", "train", "merge", "evaluation", "export"):
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert len(doc) > 80, f"finetune/{pkg}/__init__.py needs a docstring: what it owns, what it may import"
        if pkg != "config":
            assert "import" in doc, f"finetune/{pkg}/__init__.py docstring does not say what it may import"
