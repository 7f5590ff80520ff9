"""Re-exports resolved on first access: the one ``__getattr__``/``__dir__`` of the packages
whose public names live in modules that import heavy libraries (pydantic, zarr, gensim,
faiss, FastAPI, the tokenizers library), so that importing the package pays for none of them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` comes from its submodule
    ``table[name]`` (relative, e.g. ``"building.pipeline"``) the first time it is read, and
    is then kept in the package's namespace (later reads cost nothing)."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{table[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table})

    return __getattr__, __dir__
