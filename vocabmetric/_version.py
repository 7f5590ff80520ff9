"""The installed version of vocabmetric, read from the package metadata (one home: pyproject.toml)."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("vocabmetric")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
