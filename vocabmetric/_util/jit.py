"""Compile-once for numba kernels; torch-free, so the metric builders and the regularizers
share it.

numba comes with umap-learn; a caller whose kernel is missing (None) falls back or fails
with its own message.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

LOG = logging.getLogger(__name__)


def compile_once(build: Callable) -> Callable:
    """``build(numba) → kernel`` becomes ``getter() → kernel``, or None without numba.

    The kernel is built on the first call only (``cache=True`` kernels also reuse numba's
    on-disk cache across processes).
    """
    state: dict = {}

    @functools.wraps(build)
    def getter():
        if "kernel" not in state:
            try:
                import numba
            except ImportError:
                state["kernel"] = None
            else:
                state["kernel"] = build(numba)
        return state["kernel"]

    return getter
