"""The layering of docs/architecture.md, checked on the source: no import cycle anywhere in
i2v/, data_prep/ and launcher/, and every import points down the stack (or within a package).

Imports are read with `ast`, function-level ones included: a lazy import is still a dependency.
Only imports under `if TYPE_CHECKING:` are left out: they never run."""

import ast
import pathlib

from conftest import REPO

# Bottom to top. A module may import its own package and any package below it, never one above.
LAYERS = ["i2v.core", "i2v.config", "i2v.kernels", "i2v.data", "i2v.model", "i2v.checkpoint",
          "i2v.sample", "i2v.train", "i2v.plan", "i2v.data_prep", "launcher"]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "data_prep":  # installed as i2v.data_prep (setup.py)
        parts = ["i2v"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for folder in ("i2v", "data_prep", "launcher")
            for p in sorted((REPO / folder).rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
            and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
            for stmt in block.body for n in ast.walk(stmt)}


def imports_of(path: pathlib.Path, known: dict) -> set[str]:
    """The project modules `path` imports (`from pkg import mod` counts as importing pkg.mod)."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    known = source_modules()
    return {m: imports_of(p, known) - {m} for m, p in known.items()}


def layer_of(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None  # i2v/__init__.py: imports nothing


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_every_project_import_names_a_module_that_exists():
    known = source_modules()
    missing = []
    for m, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            missing += [f"{m} imports {n}" for n in names if n.startswith("i2v.") and n not in known]
    assert missing == [], "a lazy import of a moved module fails only when it runs:\n" + "\n".join(missing)


def test_every_module_has_a_layer():
    assert [m for m in source_modules() if m != "i2v" and layer_of(m) is None] == []


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = [f"{m} imports {n}" for m, deps in sorted(import_graph().items()) for n in sorted(deps)
              if layer_of(m) is not None and layer_of(n) is not None and layer_of(n) > layer_of(m)]
    assert upward == [], "imports against the layering of docs/architecture.md:\n" + "\n".join(upward)


def test_the_library_never_imports_the_offline_jobs():
    graph = import_graph()
    offenders = [f"{m} imports {n}" for m, deps in graph.items() if not m.startswith(("i2v.data_prep", "launcher"))
                 for n in deps if n.startswith("i2v.data_prep")]
    assert offenders == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"i2v.core.a": {"i2v.model.b"}, "i2v.model.b": {"i2v.core.a"}}
    assert find_cycle(graph) == ["i2v.core.a", "i2v.model.b", "i2v.core.a"]
    assert layer_of("i2v.model.b") > layer_of("i2v.core.a")
    assert find_cycle({"i2v.core.a": set(), "i2v.model.b": {"i2v.core.a"}}) is None
