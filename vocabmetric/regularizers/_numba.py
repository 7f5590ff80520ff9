"""numba kernels of the regularizers: compiled once on first use, run on rows in threads.

numba comes with umap-learn; without it every regularizer has a torch path.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch


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


_POOL = None


def run_rows(kernel, rows: tuple, shared: tuple) -> None:
    """``kernel(*rows[lo:hi], *shared)`` on contiguous blocks of rows, one per torch thread.

    ``rows`` are arrays whose first axis is split; ``shared`` are passed whole. The kernel
    must release the GIL (``nogil=True``). (numba's ``parallel=True`` would start an OpenMP
    pool whose spinning threads fight torch's own pool for the cores between calls.)
    """
    n_rows = rows[0].shape[0]
    global _POOL
    workers = max(1, min(torch.get_num_threads(), n_rows))
    if workers == 1:
        kernel(*rows, *shared)
        return
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vocabmetric-ot")
    bounds = np.linspace(0, n_rows, workers + 1).astype(int)

    def block(lo, hi):
        kernel(*(a[lo:hi] for a in rows), *shared)

    for future in [_POOL.submit(block, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        future.result()
