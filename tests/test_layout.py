"""The package's shape: dependencies run one way, and no module outgrows one concept."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vocabmetric"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str, modules: dict) -> bool:
    return modules[name].name == "__init__.py"


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """Every vocabmetric module that ``name`` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vocabmetric")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "vocabmetric":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import store` names a module, not a value
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "vocabmetric.regularizers.tree" in graph and graph["vocabmetric.regularizers.tree"]
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_its_own_package_init():
    """A submodule that imports its package's ``__init__`` (for a version, say) closes a
    circle through every module the ``__init__`` re-exports."""
    graph = import_graph()
    for name, deps in graph.items():
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        assert not deps & parents, f"{name} imports {sorted(deps & parents)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_line_budget(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it by concept"


def test_the_store_layout_in_docs_is_the_schema_docstring():
    """docs/building.md shows the store layout; its one home is store/_schema.py's docstring."""
    import textwrap

    from vocabmetric.store import _schema

    block = textwrap.dedent(_schema.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0])
    docs = (PACKAGE.parent / "docs" / "building.md").read_text()
    assert "```\n" + block + "\n```" in docs, "copy store/_schema.py's layout block into docs/building.md"


# -- the layout by job ---------------------------------------------------------------------
#: The top of the package: the public face, the errors, the CLI (and the moved-path shim).
TOP_MODULES = {"__init__.py", "errors.py", "cli.py", "_version.py", "_moved.py"}
#: One folder per job or shared contract (docs/design.md, "Layout").
TOP_PACKAGES = {"_util", "vocab", "building", "metrics", "store", "cost", "query", "regularizers", "integrations"}
ROOT = PACKAGE.parent


def test_the_top_of_the_package_is_the_public_face_and_the_job_folders():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert modules == TOP_MODULES, f"move {sorted(modules - TOP_MODULES)} into a job folder"
    assert packages == TOP_PACKAGES, f"folders {sorted(packages ^ TOP_PACKAGES)}: update docs/design.md and this test"


def private_owner(module: str) -> str | None:
    """The package a ``_x`` module path is private to (``a.b._c.d`` → ``a.b``), or None."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_private_owner():
    assert private_owner("vocabmetric.regularizers.sinkhorn._kernel") == "vocabmetric.regularizers.sinkhorn"
    assert private_owner("vocabmetric._util.vectors") == "vocabmetric"
    assert private_owner("vocabmetric.regularizers.sinkhorn") is None


def test_inside_the_package_no_module_reaches_into_another_packages_private_modules():
    bad = [f"{name} → {dep}" for name, deps in import_graph().items() for dep in deps
           if (owner := private_owner(dep)) and not (name == owner or name.startswith(owner + "."))]
    assert not bad, bad


def imported_modules(source: str) -> set[str]:
    """The vocabmetric modules a script imports (``from vocabmetric.a import _b`` names a._b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vocabmetric"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vocabmetric"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_"))
    return found


def test_the_scripts_and_the_docs_use_public_names_only():
    """Benchmarks, examples, experiments and the docs' code use public names: the public line
    is drawn once, by the packages' ``__init__``; tests may reach inside."""
    bad = []
    for folder in ("benchmarks", "examples", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            bad += [f"{path.relative_to(ROOT)}: {m}" for m in imported_modules(path.read_text()) if private_owner(m)]
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for block in path.read_text().split("```python")[1:]:
            code = block.split("```", 1)[0]
            try:
                names = imported_modules(code)
            except SyntaxError:
                continue
            bad += [f"{path.relative_to(ROOT)}: {m}" for m in names if private_owner(m)]
    assert not bad, bad


def test_a_script_reaching_inside_is_caught():
    assert imported_modules("from vocabmetric.regularizers.sinkhorn import _kernel") >= {
        "vocabmetric.regularizers.sinkhorn._kernel"}
    assert private_owner("vocabmetric.regularizers.sinkhorn._kernel")


def test_moved_paths_import_as_the_new_module_with_a_warning():
    import importlib
    import sys

    from vocabmetric._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert module.__spec__.name == new
        sys.modules.pop(old, None)


def test_no_folder_shadows_a_public_name_of_the_package():
    """Importing a subpackage sets it as an attribute of ``vocabmetric``: a folder named like
    a public name (``build``) would turn ``vocabmetric.build(...)`` into a module."""
    import vocabmetric

    assert not TOP_PACKAGES & set(vocabmetric.__all__)
    code = ("import vocabmetric, vocabmetric.building.pipeline, vocabmetric.query.report, vocabmetric.vocab.tokenizer;"
            "assert callable(vocabmetric.build) and callable(vocabmetric.open_store), vocabmetric.build")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True)
