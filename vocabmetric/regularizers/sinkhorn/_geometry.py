"""The geometry protocol: the few operations of a cost that a Sinkhorn solver may call.

As ott-jax's ``Geometry`` lists ``apply_lse_kernel``, ``apply_kernel`` and
``update_potential``, this block is the whole of what the solvers (:mod:`._solver`,
:mod:`._scaling_solver`) and the acceleration strategies (:mod:`._acceleration`) know of a
cost. Two geometries keep it:

* :class:`~._kernel.SparseLogKernel` — the full vocabulary's truncated kNN cost,
  ``K = e^{−cap/ε}·11ᵀ + S`` with S sparse (k stored entries per token), token-major
  ``(V, n)`` tensors over the tokens renumbered for locality; numba on CPU, Triton on CUDA,
  torch elsewhere.
* :class:`~._support.DenseLogKernel` — the support mode's ``(r, s, s)`` dense costs, one
  per position, ``(n, s)`` tensors.

Operations (``h (tokens, n)`` or ``(n, tokens)`` in the geometry's layout; ``rows (n,)``
the position of each column, for a per-position cost)::

    geometry(h, eps, rows=None, out=None, scale=1.0)
        scale · log Σ_j exp(h_j − C_ij/ε)                    every geometry (the log domain)
        cost: O(V·k) per position (sparse), O(s²) (dense); out may be h itself
    geometry.neg_cost(eps, rows)
        −C/ε of the problems rows, (len(rows), s, s)         dense: Newton's pair (:mod:`._newton`)
    geometry.cap, geometry.csr_torch
        the cap and the CSR table (indptr, nbr, costs)       sparse: the heavy block (:mod:`._heavy`)
    geometry.path, geometry.dtype, geometry.csr, geometry.csr_weights(eps)
        the backend, the compute dtype, the CSR table and    sparse, numba path: the scaling
        its per-ε weights (log e^{−c/ε}−δ, e^{−c/ε}−δ)        domain (:class:`~._scaling.LinearKernel`:
                                                               K w and 1/K(m ⊙ ψ), two passes)
    geometry.permutation, geometry.release()
        the token order (order, rank); frees scratch          sparse: the full-mode routine

Nothing else of a cost is read by a solver: a new backend (a fused GPU kernel, another
truncation) is a new geometry that keeps these operations.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Geometry(Protocol):
    """What every solver calls: the log-kernel ``scale · log Σ_j exp(h_j − C_ij/ε)``."""

    def __call__(self, h: torch.Tensor, eps: float, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor: ...


@runtime_checkable
class DenseGeometry(Geometry, Protocol):
    """A geometry with one small dense cost per position (support mode)."""

    def neg_cost(self, eps: float, rows: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SparseGeometry(Geometry, Protocol):
    """The full vocabulary's truncated cost, as a CSR table (the heavy block and the
    scaling domain read it)."""

    cap: float
    dtype: torch.dtype

    @property
    def path(self) -> str: ...

    @property
    def csr_torch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def csr_weights(self, eps: float): ...

    def release(self) -> None: ...
