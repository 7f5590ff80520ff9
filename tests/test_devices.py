"""Every tensor a regularizer or an integration makes lives on its inputs' device.

A GPU run once crashed in ``_heavy.gram`` on ``torch.zeros((r, h), dtype=w.dtype)``: made
on the CPU, then scattered into from CUDA tensors. CPU CI cannot see such a bug by running
the code, so this test reads the source instead (an ``ast`` walk, no GPU): a torch tensor
factory (``torch.zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``tensor``, ``rand*``,
``eye``, ``linspace`` …) must name ``device=``; the ``*_like`` factories and
``x.new_*`` take their source's device and pass. The few calls that are CPU by design
(numpy interop on the CPU kernels' path) are listed in :data:`CPU_ONLY`, each with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vocabmetric"
#: The folders whose code makes tensors from a caller's tensors.
FOLDERS = ("regularizers", "integrations")

#: torch functions that make a new tensor on the default (CPU) device unless told otherwise.
FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "arange", "range", "tensor", "as_tensor", "asarray",
    "rand", "randn", "randint", "randperm", "normal", "eye", "linspace", "logspace",
    "empty_strided", "sparse_coo_tensor", "sparse_csr_tensor", "from_numpy", "scalar_tensor",
})

#: (file relative to vocabmetric/, enclosing function, factory): CPU by design.
CPU_ONLY = {
    # the numba kernels (path == "numba": CPU tensors only) return numpy arrays
    ("regularizers/sinkhorn/_scaling.py", "weigh", "from_numpy"),
    ("regularizers/sinkhorn/_scaling.py", "ratio_error", "from_numpy"),
    ("regularizers/sinkhorn/_scaling.py", "average", "from_numpy"),
    ("regularizers/sinkhorn/_scaling.py", "solve_scaled", "from_numpy"),
    # per-ε kernel weights computed on the CPU from the operator's numpy tables (numpy out)
    ("regularizers/sinkhorn/_kernel.py", "make", "from_numpy"),
    # the embeddings are a CPU copy of the caller's array, moved to the logits' device per call
    ("regularizers/sinkhorn/_divergence.py", "__init__", "as_tensor"),
}


def factory_calls(source: str):
    """``(enclosing function, factory name, line, has device=)`` for each ``torch.<factory>(…)``."""
    tree = ast.parse(source)
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch"
                    and child.func.attr in FACTORIES):
                has_device = any(k.arg == "device" or k.arg is None for k in child.keywords)  # **kw may carry it
                found.append((name, child.func.attr, child.lineno, has_device))
            visit(child, name)

    visit(tree, "<module>")
    return found


def deviceless(source: str, relative: str) -> list[str]:
    return [f"vocabmetric/{relative}:{line} torch.{factory}(…) in {function}() names no device="
            for function, factory, line, has_device in factory_calls(source)
            if not has_device and (relative, function, factory) not in CPU_ONLY]


def package_files():
    return sorted(p for folder in FOLDERS for p in (PACKAGE / folder).rglob("*.py"))


def test_every_tensor_factory_names_a_device():
    problems = [msg for path in package_files()
                for msg in deviceless(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    assert not problems, "make these on the inputs' device (device=x.device, or x.new_*/torch.*_like):\n" + \
        "\n".join(problems)


def test_the_allow_list_names_calls_that_exist():
    """A stale entry would silently allow a future call of that name."""
    calls = {(path.relative_to(PACKAGE).as_posix(), function, factory)
             for path in package_files() for function, factory, _, _ in factory_calls(path.read_text())}
    assert CPU_ONLY <= calls, sorted(CPU_ONLY - calls)


@pytest.mark.parametrize("snippet, bad", [
    ("def gram(w):\n    return torch.zeros((3, 4), dtype=w.dtype)\n", 1),  # the bug that crashed on CUDA
    ("def f(x):\n    return torch.arange(5), torch.full((2,), 1.0, device=x.device)\n", 1),
    ("def f(x):\n    return torch.zeros_like(x), x.new_zeros(3), torch.empty(2, device=x.device)\n", 0),
    ("def f(x, **kw):\n    return torch.ones(3, **kw)\n", 0),
])
def test_the_check_catches_a_deviceless_factory(snippet, bad):
    """The test can fail: it finds the CPU-made tensor of the original ``gram``."""
    assert len(deviceless("import torch\n" + snippet, "regularizers/x.py")) == bad
