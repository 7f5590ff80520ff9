"""The Sinkhorn divergence on a truncated ground cost, and the pieces its solvers are made of.

``SinkhornDivergence`` is the penalty (``regularizers.sinkhorn`` in the registry). The rest
are public for benchmarks and tests that time or check one piece on its own:

- the sparse log-kernel (:class:`SparseLogKernel`: numba on CPU, Triton on CUDA, torch
  elsewhere) — the one operation a full-vocabulary iteration applies to the cost;
- the ε schedule (:func:`eps_schedule`);
- the support problem's dense kernel (:class:`DenseLogKernel`).
"""
from ._divergence import SinkhornDivergence as SinkhornDivergence
from ._kernel import SparseLogKernel as SparseLogKernel, locality_order as locality_order
from ._solver import eps_schedule as eps_schedule
from ._support import DenseLogKernel as DenseLogKernel
