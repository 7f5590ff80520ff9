"""Debiased Sinkhorn divergence between next-token distributions, on a truncated cost.

The entropic optimal-transport cost between two distributions ``p`` and ``q`` over the
vocabulary is

.. math::

    OT_ε(p, q) = \\min_{P 1 = p,\\ P^T 1 = q} ⟨P, C⟩ + ε·KL(P ‖ p⊗q)
               = ⟨p, f⟩ + ⟨q, g⟩          (f, g: the optimal dual potentials)

and the debiased Sinkhorn divergence (Feydy et al. 2019) is

.. math::

    S_ε(p, q) = OT_ε(p, q) − ½·OT_ε(p, p) − ½·OT_ε(q, q),

which is 0, with gradient 0, at ``p = q``: a regularizer must not push a policy that
already equals its reference.

Two ways to lay the problem out:

* **Full vocabulary** (``support=None``). The cost is the truncated
  :class:`~vocabmetric.operator.CostOperator` (k neighbours, ``cap`` elsewhere, 0 on the
  diagonal), so the Gibbs kernel is a rank-one part plus a sparse part,
  ``K = exp(−cap/ε)·11ᵀ + S`` with ``S_ij = exp(−c_ij/ε) − exp(−cap/ε) ≥ 0`` on the stored
  entries and the diagonal. In the log domain one kernel application is::

      log(K w)_i = logaddexp(−cap/ε + LSE_j h_j,
                             LSE_{j∈N(i)} [h_j − c_ij/ε + log1mexp((cap − c_ij)/ε)])

  with ``h_j = log w_j`` (``= log q_j + g_j/ε`` in a Sinkhorn update) and N(i) the stored
  neighbours of i plus i itself (c_ii = 0): O(V·k) per position, never O(V²). On CPU a
  numba kernel does one multiply-add per stored entry (linear domain, log-domain fallback);
  on CUDA a Triton kernel (:mod:`._triton`) sums exactly in the log domain; elsewhere a torch
  path gathers rows grouped by degree. The solver keeps this mode's potentials token-major,
  (V, n), over the tokens renumbered for locality (:func:`locality_order`), so each stored
  entry reads one contiguous row of n values, mostly from cache.
* **Support** (``support=m``). Per position the support is top-m(p) ∪ top-m(q) plus one
  "rest" bin holding the remaining mass at cost ``cap`` from every other point; the
  (2m+1)² cost sub-matrix is gathered from the operator (or computed from embeddings), and
  a kernel application is one batched matrix-vector product with ``K = exp(−C/ε)`` (the
  linear domain, shifted per row; positions whose sums leave the dtype's range are redone
  in the log domain). O(m²) per position and iteration: the practical mode for training.
  The pair OT(p, q) is solved by Newton's method (:mod:`._newton`, O(m³) per step) for
  m ≤ 128: at ε = cap/15 between peaked distributions it converges in tens of steps where
  alternating updates take hundreds to thousands.

Positions are solved in chunks (:func:`~._chunks.solve_by_chunks`): ``p``, ``q`` and the
potential live in reused (chunk, V) buffers, and ``∂S/∂z`` is written per chunk, so no
temporary spans all N positions.

Solver. The potentials solve, in the log domain (stable in float32 down to ε = 0.01·cap),
``f_i = −ε·log Σ_j q_j exp((g_j − C_ij)/ε)`` and ``g_j = −ε·log Σ_i p_i exp((f_i − C_ij)/ε)``.
ε is annealed geometrically from ``cap`` down to its target with one averaged update per
step (ε-scaling, Feydy 2019 Alg. 3.5) of the self-transport potentials; at the target ε
the two symmetric problems OT(p, p), OT(q, q) (update ``f ← ½(f + T_p(f))``, stacked in one
kernel call) run to a marginal error ``tol``, then the pair OT(p, q) (alternating
updates; Newton steps in support mode) starts from OT(q, q)'s potential — the exact
solution when p = q. A position
leaves the active set as soon as it has converged. Without debiasing the pair is annealed.

Gradient (envelope theorem, never backpropagation through the iterations):
``∂S/∂p = f_pq − f_pp`` (defined up to a constant) and, through the softmax,
``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` with ``h = f_pq − f_pp``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import VocabMetricError
from ..operator import CostOperator
from ._chunks import solve_by_chunks
from ._inputs import Reference
from ._newton import newton_pair
from ._numba import compile_once, prefetch, run_rows
from ._penalty import Penalty
from ._triton import padded_rows, sparse_lse_kernel

LOG = logging.getLogger(__name__)

#: Default scratch memory for one chunk of positions (the gathered (rows, V, width) block).
CHUNK_BYTES = 128 * 2**20
#: The same for the fused CPU kernel's (V,)-vectors per position: a chunk of 64–128
#: positions amortizes each stored entry's index and weight over as many multiply-adds
#: (per position 1.3× faster at 80 than at 20, V = 100k). The chunk is rounded down to a
#: multiple of ``FUSED_CHUNK_ALIGN`` positions: torch's column max over a (V, n) tensor
#: takes 1 ms at n = 64 and 6 ms at n = 80 (its fast path wants n a multiple of 32).
FUSED_CHUNK_BYTES = 512 * 2**20
FUSED_CHUNK_ALIGN = 32
#: The same on a GPU, for the Triton kernel's (V,)-vectors per position: large chunks keep
#: it busy, and every chunk pays the solver's per-iteration launches and syncs.
GPU_CHUNK_BYTES = 4 * 2**30

_NEG_INF = float("-inf")
#: Support mode solves the pair by Newton steps (O(s³) each, tens of them) up to this many
#: support points s = 2m + 1, and by alternating updates (O(s²) each, hundreds to
#: thousands at small ε) above it, where a Newton step costs more than they do.
NEWTON_MAX_POINTS = 257


# -- log-domain kernels --------------------------------------------------------------------
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(−x))`` for ``x ≥ 0``, accurate at both ends (Mächler 2012); −inf at 0."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


def _degree_widths(width: int) -> list[int]:
    """Bucket widths 1, 2, 4, 8, 12, 16, 24, 32, 48, … up to ``width`` (padding ≤ 1.5×)."""
    out, w = [1, 2, 4], 8
    while out[-1] < width:
        out += [w, w * 3 // 2]
        w *= 2
    return sorted({min(x, width) for x in out})


def _per_eps(cache: dict, eps: float, make: Callable) -> Any:
    """``cache[eps]``, made by ``make()`` on first use; ε schedules are short, and the oldest
    entry goes beyond 64 to keep memory bounded anyway."""
    if eps not in cache:
        cache[eps] = make()
        if len(cache) > 64:
            cache.pop(next(iter(cache)))
    return cache[eps]


def _csr_table(index: np.ndarray, costs: np.ndarray, cap: float) -> tuple:
    """``(indptr int64, neighbours int32, costs float64)``: each row's entries of cost
    below ``cap`` (the row itself first), the only ones with a non-zero weight in S."""
    keep = costs < cap
    indptr = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=indptr[1:])
    return indptr, index[keep].astype(np.int32), costs[keep].astype(np.float64)


def locality_order(indptr: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """A token order that puts neighbours next to each other: reverse Cuthill–McKee on the
    (symmetric) neighbour graph, O(nnz).

    A kernel application reads one (rows,)-vector per stored entry, at the neighbour's
    position; in the vocabulary's own order a kNN graph's neighbours lie anywhere (mean
    distance ~V/3), and in this order within a few hundred positions on a clustered
    graph, so the reads come from cache instead of memory. (A random graph has no such
    order: RCM then leaves the bandwidth about where it was, and costs nothing after.)
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    V = len(indptr) - 1
    graph = csr_matrix((np.ones(len(nbr), np.int8), nbr, indptr), shape=(V, V))
    return np.asarray(reverse_cuthill_mckee(graph, symmetric_mode=True), dtype=np.int64)


class _SparseLogKernel:
    """``h ↦ log Σ_j exp(h_j − C_ij/ε)`` for a symmetric truncated cost, O(V·k) per row.

    **Layout.** Inputs and outputs are token-major, ``(V, n)``: a neighbour's values for
    all n positions are one contiguous row, read once per stored entry, and the result is
    written a row per token. The tokens are the vocabulary permuted by :attr:`order`
    (:func:`locality_order`), so neighbours sit near each other in memory. The solver keeps
    its potentials in this layout; the module permutes and transposes ``p`` and ``q`` once
    per chunk, and the gradient back once.

    The operator is held once, as a CSR table of each row's entries below the cap (itself
    first, cost 0), in that order; the fused CPU path (numba) and the GPU path (Triton,
    exact log domain) read it as is. The torch path (any device, when neither is there)
    builds from it, on first use, ELL tables, one per bucket of rows of similar degree,
    whose padding slots point at the row itself with weight −inf. The per-ε weights
    ``−c/ε + log1mexp((cap − c)/ε)`` are cached, so an ε schedule is paid once per module.
    """

    def __init__(self, op: CostOperator, device: Any, dtype: torch.dtype):
        V = op.vocab_size
        rows = np.arange(V, dtype=np.int64)[:, None]
        valid = (op.indices >= 0) & (op.indices != rows)
        slots = np.argsort(~valid, axis=1, kind="stable")  # stored slots first
        nb = np.take_along_axis(np.where(valid, op.indices, rows), slots, 1)
        cs = np.take_along_axis(np.where(valid, op.costs, np.inf), slots, 1)
        index = np.concatenate([rows, nb], 1)
        costs = np.concatenate([np.zeros((V, 1)), cs], 1)
        self.cap, self.vocab_size, self.dtype, self.device = op.cap, V, dtype, device
        #: ``order[i]``: the vocabulary id at the kernel's position i; ``rank`` its inverse
        self.order = locality_order(*_csr_table(index, costs, op.cap)[:2])
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(V)
        self._csr = _csr_table(self.rank[index[self.order]], costs[self.order], op.cap)
        self._tables: dict[float, list[torch.Tensor]] = {}
        self._tokens = np.arange(V, dtype=np.int32)  # the fused path's rows, all tokens
        self._low = np.zeros(V, dtype=np.bool_)  # and its flags of sums below e^accept
        self._weights: dict[float, tuple] = {}  # and its (log-weight, weight) pairs per ε
        self._buffers: torch.Tensor | None = None  # its scratch during one forward
        self._device_log_k: dict[float, torch.Tensor] = {}  # the GPU path's per-ε log-weights

    @functools.cached_property
    def buckets(self) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, int]]:
        """The torch path's ELL tables ``(row ids or None for all, flat (rows·w,) neighbour
        ids, (rows, w) float64 costs, w)``, one per degree bucket, on the kernel's device."""
        indptr, nbr, costs = self._csr
        degree = np.diff(indptr)  # ≥ 1: the row itself
        out, lo = [], 0
        for w in _degree_widths(int(degree.max())):
            members = np.flatnonzero((degree > lo) & (degree <= w))
            lo = w
            if not len(members):
                continue
            real = np.arange(w) < degree[members, None]
            slot = np.where(real, indptr[members, None] + np.arange(w), 0)
            out.append((
                None if len(members) == self.vocab_size else torch.as_tensor(members, device=self.device),
                torch.as_tensor(np.where(real, nbr[slot], members[:, None]).reshape(-1), device=self.device),
                torch.as_tensor(np.where(real, costs[slot], np.inf), device=self.device),
                w,
            ))
        return out

    @property
    def width(self) -> float:
        """The torch path's mean padded row width (its gathered block is n·V·width)."""
        return sum(len(b[1]) for b in self.buckets) / self.vocab_size

    def tables(self, eps: float) -> list[torch.Tensor]:
        """The torch path's per-ε log-weights, one (rows, w) table per bucket; padding (cost
        inf) and the cap itself get weight −inf: exactly 0 in S."""
        return _per_eps(self._tables, eps, lambda: [
            torch.nan_to_num(_log1mexp((self.cap - c).clamp_min(0) / eps) - c / eps, nan=_NEG_INF)
            .to(self.dtype)
            .contiguous()
            for _, _, c, _ in self.buckets
        ])

    @property
    def path(self) -> str:
        """The path that runs on this kernel's device: ``"numba"`` (CPU, with numba),
        ``"triton"`` (CUDA, with Triton) or ``"torch"`` (the gathered blocks, anywhere)."""
        kind = torch.device(self.device).type
        if kind == "cpu" and _numba_sparse_lse() is not None:
            return "numba"
        if kind == "cuda" and sparse_lse_kernel() is not None:
            return "triton"
        return "torch"

    def __call__(self, h: torch.Tensor, eps: float, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """``scale ×`` the log-kernel of ``h (V, n)``, token-major (on the kernel's device);
        ``out`` (may be ``h`` itself) receives it if given."""
        if self.path == "numba":
            return self._fused(h, eps, out, scale)
        result = self._triton(h, eps, out) if self.path == "triton" else self._gathered(h, eps, out)
        return result if scale == 1.0 else result.mul_(scale)

    def _triton(self, h: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """The GPU path: the Triton kernel over the CSR table (see :mod:`._triton`), reading
        a copy of ``h (V, n)`` with 64-byte aligned rows (``out`` may be ``h`` itself)."""
        indptr, nbr, log_k = self._csr_tensors(eps)
        h = h.detach().to(self.dtype)
        dense = torch.logsumexp(h, 0).sub_(self.cap / eps)  # −inf for a position of only −inf
        h_t = padded_rows(h)
        if out is None or out.dtype != self.dtype or not out.is_contiguous():
            out = torch.empty_like(h)
        sparse_lse_kernel()(h_t, indptr, nbr, log_k, dense, out)
        return out

    @functools.cached_property
    def permutation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, rank)`` on the kernel's device: ``x[:, order]`` is in the kernel's
        token order, and ``y[:, rank]`` takes it back."""
        return (torch.as_tensor(self.order, device=self.device),
                torch.as_tensor(self.rank, device=self.device))

    @functools.cached_property
    def _device_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CSR table's ``(indptr, nbr)`` on the kernel's device (the GPU path's)."""
        indptr, nbr, _ = self._csr
        return torch.as_tensor(indptr, device=self.device), torch.as_tensor(nbr, device=self.device)

    def _csr_tensors(self, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indptr, nbr, log_k)`` on the kernel's device; ``log_k`` in the compute dtype, per ε."""
        log_k = _per_eps(self._device_log_k, eps, lambda: torch.as_tensor(
            self._csr_weights(eps)[0], device=self.device).to(self.dtype))
        return (*self._device_csr, log_k)

    def _gathered(self, h: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """The torch path (any device): gather each bucket's ``[n, members, w]`` block
        (position-major: ``h (V, n)`` is transposed on the way in and out)."""
        result = self._gathered_rows(h.t().contiguous(), eps)
        return result.t().contiguous() if out is None else out.copy_(result.t())

    def _gathered_rows(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        n = h.shape[0]
        lse_all = torch.empty_like(h) if len(self.buckets) > 1 else None
        for (ids, flat, _, w), table in zip(self.buckets, self.tables(eps)):
            block = torch.index_select(h, 1, flat).view(n, -1, w)
            block += table
            lse = _lse_(block)
            if lse_all is None:
                lse_all = lse
            else:
                lse_all.index_copy_(1, ids, lse)
        dense = _lse_(h.clone()).unsqueeze_(-1) - self.cap / eps
        return torch.logaddexp(lse_all, dense)


    def _fused(self, h: torch.Tensor, eps: float, out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """The CPU path (numba): never the ``[n, V, w]`` block the torch path gathers, so
        O(n·V) memory instead of O(n·V·w), and no ``exp`` in the inner loop.

        With ``m_r = max_j h[j, r]``, ``E = exp(h − m)`` (positions as the contiguous inner
        axis, in the compute dtype) and ``K = exp(table)`` (one CSR entry per stored
        neighbour, no padding), a token's value is
        ``m_r + log(Σ_j K_ij E[j, r] + exp(dense_r − m_r))``: one multiply-add per stored
        neighbour, vectorized over the positions. Exponents are raised to ``floor`` before
        ``exp`` (no subnormals), which moves a sum by less than ``deg·e^floor``; a sum
        above ``e^accept`` is therefore exact to the dtype's precision, and a (token, row)
        below it — every neighbour far below the row's largest weight, which the dense
        term rules out unless cap/ε > −accept (57 in float32, 640 in float64) — is
        recomputed in the log domain.
        """
        indptr, nbr, _ = self._csr
        floor, accept = _FUSED_RANGE[self.dtype]
        log_k, k = self._csr_weights(eps)
        h = h.detach().to(self.dtype)
        V, n = h.shape
        top = h.amax(0)
        finite = torch.isfinite(top)
        top = torch.where(finite, top, 0.0)
        shifted, e_t = self._scratch(n)  # (V, n), reused: see release(); ``out`` may be ``h``
        torch.sub(h, top, out=shifted)  # shifted log-weights (−inf kept for the fallback)
        torch.clamp(shifted, min=floor, out=e_t).exp_()
        # every position's dense term: −cap/ε + LSE_j h_j − m_r = −cap/ε + log Σ_j E[j, r]
        dense = torch.where(finite, e_t.sum(0).log_(), _NEG_INF).double() - self.cap / eps
        base = dense.clamp(min=floor).exp().to(self.dtype)
        if out is None or out.dtype != self.dtype or not out.is_contiguous():
            out = torch.empty_like(h)  # (V, n)
        sparse_sum, log_domain = _numba_sparse_lse()
        low = self._low
        run_rows(sparse_sum, (self._tokens, self._far), (indptr, nbr, k, e_t.numpy(), base.numpy(),
                                                            math.exp(accept), out.numpy(), low), cumulative=indptr)
        out.log_()
        if low.any():  # sums below e^accept: those (token, position) pairs in the log domain
            log_domain(np.flatnonzero(low), indptr, nbr, log_k, shifted.numpy(), dense.numpy(), accept, out.numpy())
        return torch.add(top.mul_(scale), out, alpha=scale, out=out)  # scale·(log-sum + shift), one pass

    @functools.cached_property
    def _far(self) -> np.ndarray:
        """The fused path's per-token prefetch flag (int32, 0 or 1): 1 where some neighbour
        is more than 4096 rows away in memory (L2 holds about that many rows of 64
        positions), 0 where the locality order made them all near. Every row holds
        itself, so no row of the CSR table is empty."""
        indptr, nbr, _ = self._csr
        rows = np.repeat(np.arange(self.vocab_size), np.diff(indptr))
        far = np.abs(nbr.astype(np.int64) - rows) > 4096
        return np.logical_or.reduceat(far, indptr[:-1]).astype(np.int32)

    def _scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (V, n) buffers for the fused path (the shifted input and its exp), kept until
        :meth:`release` (a Sinkhorn solve calls the kernel hundreds of times, and a fresh
        25–50 MB tensor costs thousands of page faults each time)."""
        size = self.vocab_size * n
        if self._buffers is None or self._buffers.shape[1] < size:
            self._buffers = torch.empty(2, size, dtype=self.dtype)
        return tuple(b[:size].view(self.vocab_size, n) for b in self._buffers)

    def release(self) -> None:
        """Free the fused path's scratch (the module calls it after each forward)."""
        self._buffers = None

    def _csr_weights(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """The fused path's per-ε weights: float64 ``log K`` (for the log-domain fallback)
        and ``K = exp(max(log K, floor))`` in the compute dtype, one per CSR entry."""
        def make():
            c = self._csr[2]
            log_k = np.nan_to_num(_log1mexp(torch.from_numpy((self.cap - c) / eps)).numpy() - c / eps,
                                  nan=_NEG_INF)
            k = np.exp(np.maximum(log_k, _FUSED_RANGE[self.dtype][0]))
            return log_k, k.astype(np.float32 if self.dtype == torch.float32 else np.float64)

        return _per_eps(self._weights, eps, make)


#: The fused kernel's exponent floor and accepted range per compute dtype: e^floor is a
#: normal number, and deg·e^floor (deg ≤ 1e4) is below half an ulp of any sum above e^accept.
_FUSED_RANGE = {torch.float32: (-80.0, -57.0), torch.float64: (-700.0, -655.0)}


@compile_once
def _numba_sparse_lse(numba):
    """The fused sparse log-kernel (cached on disk): ``(sparse_sum, log_domain)``.

    ``sparse_sum`` — for each token ``i`` in ``tokens`` and every position ``r``, with CSR
    weights ``k`` of i's stored neighbours (i itself included) and ``e ≈ exp(h)``:
    ``out[i, r] = Σ_t k[t]·e[nbr[t], r] + base[r]``, accumulated in place in out's row i
    (token-major, as the solver keeps its potentials); ``low[i] = 1`` where some sum is at
    most ``accept``. The caller takes the log in one vectorized pass. Serial and GIL-free:
    :func:`~._numba.run_rows` gives each thread a range of tokens.

    ``log_domain`` — after that pass, for the flagged tokens, each ``out[i, r]`` at most
    ``log(accept)`` is recomputed in float64 in the log domain from the shifted
    log-weights ``h`` and ``log_k`` (two passes: max, then the exps above max − 80):
    ``out[i, r] = log(e^{dense_r} + Σ_t e^{h[nbr[t], r] + log_k[t]})``.

    ``far`` (per token, sliced with ``tokens``) is non-zero where the token's neighbours lie
    far apart in memory: the kernel prefetches the row 8 entries on there, not elsewhere.
    """

    fetch = prefetch()
    ahead = 8  # entries: enough to cover a cache miss, few enough to stay in L1

    @numba.njit(cache=True, nogil=True, fastmath={"contract"})
    def sparse_sum(tokens, far, indptr, nbr, k, e, base, accept, out, low):
        n = e.shape[1]
        nnz = nbr.shape[0]
        line = 64 // e.itemsize  # elements per cache line
        for x in range(tokens.shape[0]):
            i = tokens[x]
            acc = out[i]
            acc[:] = base
            for t in range(indptr[i], indptr[i + 1]):
                if far[x] and t + ahead < nnz:  # the row 8 entries on is far: start it now
                    for col in range(0, n, line):
                        fetch(e, nbr[t + ahead], col)
                kij = k[t]
                row = e[nbr[t]]
                for r in range(n):
                    acc[r] += kij * row[r]
            small = 0
            for r in range(n):
                small += acc[r] <= accept
            low[i] = small > 0

    @numba.njit(cache=True, nogil=True)
    def log_domain(tokens, indptr, nbr, log_k, h, dense, log_accept, out):
        for i in tokens:
            row_out = out[i]
            for r in range(h.shape[1]):
                if row_out[r] > log_accept:
                    continue
                top = dense[r]
                for t in range(indptr[i], indptr[i + 1]):
                    v = np.float64(h[nbr[t], r]) + log_k[t]
                    if v > top:
                        top = v
                if top == -np.inf:
                    row_out[r] = top
                    continue
                total = np.exp(dense[r] - top) if dense[r] - top > _FLOOR else 0.0
                for t in range(indptr[i], indptr[i + 1]):
                    v = np.float64(h[nbr[t], r]) + log_k[t] - top
                    if v > _FLOOR:
                        total += np.exp(v)
                row_out[r] = top + np.log(total)

    return sparse_sum, log_domain


def _lse_(block: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension, overwriting ``block`` (no second temporary).

    Terms more than ``_FLOOR`` below the row's largest are raised to it before ``exp``:
    they weigh < 1e-30 relative (float32 keeps 1e-7) and exp of an input that underflows
    (or of −inf) takes a slow scalar path in torch's CPU kernels, ~20× slower. A row of
    only −inf stays −inf.
    """
    top = block.amax(-1)
    finite = torch.isfinite(top)
    top = torch.where(finite, top, 0.0)
    block -= top[..., None]
    block.clamp_(min=_FLOOR).exp_()
    lse = block.sum(-1).log_().add_(top)
    return torch.where(finite, lse, _NEG_INF)


#: exp(−80) ≈ 1.8e-35 is a normal float32, so exp never underflows after the clamp.
_FLOOR = -80.0


class _DenseLogKernel:
    """``h ↦ log Σ_j exp(h_j − C_ij/ε)`` for a batch of small dense costs ``(r, s, s)``;
    ``rows`` picks each input row's cost matrix.

    In the linear domain, as the fused sparse kernel: with ``m = max_j h_j``,
    ``E = exp(h − m)`` and ``K = exp(−C/ε)`` (cached per ε, both raised to ``floor``
    before ``exp``), ``log(K E) + m`` is one batched matrix-vector product per position —
    s² multiply-adds, no ``exp`` — instead of s² exps. Where a sum is at most ``e^accept``
    (every term far below the row's largest, ``cap/ε`` beyond the dtype's range) the
    position is recomputed in the log domain. Stacked problems (``rows`` = 0..r−1 repeated,
    as the solver stacks them) share one product with k columns, without copying K.
    """

    def __init__(self, cost: torch.Tensor):
        self.cost = cost
        self._scaled: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scaled_kernel(self, eps: float, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(−C/ε, K)``, made once per ε of the schedule (only the last is kept)."""
        if eps not in self._scaled:
            scaled = self.cost / -eps
            self._scaled = {eps: (scaled, scaled.clamp(min=floor).exp_())}
        return self._scaled[eps]

    def neg_cost(self, eps: float, rows: torch.Tensor) -> torch.Tensor:
        """``−C/ε`` of the problems ``rows``: a new ``(len(rows), s, s)`` tensor."""
        floor = _FUSED_RANGE.get(self.cost.dtype, _FUSED_RANGE[torch.float32])[0]
        return self._scaled_kernel(eps, floor)[0].index_select(0, rows)

    def __call__(self, h: torch.Tensor, eps: float, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        floor, accept = _FUSED_RANGE.get(h.dtype, _FUSED_RANGE[torch.float32])
        scaled, kernel = self._scaled_kernel(eps, floor)
        r, s = kernel.shape[0], kernel.shape[-1]
        n = h.shape[0]
        top = h.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        e = torch.sub(h, top).clamp_(min=floor).exp_()
        if rows is None or (n % r == 0 and torch.equal(rows, torch.arange(r, device=rows.device).repeat(n // r))):
            k = n // r  # stacked copies of the r positions: K (r, s, s) @ E (r, s, k)
            lin = torch.bmm(kernel, e.view(k, r, s).permute(1, 2, 0)).permute(2, 0, 1).reshape(n, s)
        else:
            lin = torch.bmm(kernel.index_select(0, rows), e.unsqueeze(-1)).squeeze(-1)
        low = (lin <= math.exp(accept)).any(-1)
        result = lin.log_().add_(top)
        if low.any():  # those positions in the log domain: one gathered (m, s, s) block
            pick = low.nonzero()[:, 0]
            source = rows if rows is not None else torch.arange(r, device=h.device).repeat(n // r)
            block = scaled.index_select(0, source[pick])
            block += h[pick, None, :]
            result[pick] = _lse_(block)
        return result if scale == 1.0 else result.mul_(scale)


# -- the solver ----------------------------------------------------------------------------
def _eps_schedule(eps: float, cap: float, scaling: float) -> list[float]:
    """Geometric ε annealing from ``cap`` down to ``eps`` (the last entry is ``eps``)."""
    if not 0 < scaling < 1 or eps >= cap:
        return [eps]
    n = int(math.ceil(math.log(cap / eps) / -math.log(scaling)))
    return [cap * scaling**s for s in range(n) if cap * scaling**s > eps] + [eps]


def _marginal_error(mass: torch.Tensor, old: torch.Tensor, new: torch.Tensor, eps: float,
                    tokens: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position L1 marginal error ``Σ_j m_j |exp((old_j − new_j)/ε) − 1|`` (j along
    the ``tokens`` axis).

    For the plan built from ``old`` and the other side's fresh potential, this is
    ``‖P^T 1 − m‖₁``: ``new`` is what ``old`` would have to become to fit ``m`` exactly.
    (Potentials are always finite; the clamp keeps exp on its fast path. ``exp − 1``, not
    ``expm1``: half the time on CPU, and its rounding, an ulp of 1 per token — 6e-8 in
    float32 — is far below any tolerance float32 can meet.) ``out``: scratch of old's shape
    for the ratio.
    """
    ratio = torch.sub(old, new, out=out).div_(eps).clamp_(_FLOOR, 50.0).exp_().sub_(1.0).abs_()
    return ratio.mul_(mass).sum(tokens)


def _log_probs(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p.clamp_min(torch.finfo(p.dtype).tiny).log(), _NEG_INF)


class _Pool:
    """Dead (V, n) potentials kept for the next one of that size, instead of freed.

    On the full vocabulary every kernel application makes a new potential; at V = 100k
    and 128 stacked positions that is 51 MB, above glibc's largest mmap threshold (32 MiB),
    so a fresh one is mapped and page-faulted in each time (an add over 160 positions: 32 ms
    into a fresh tensor, 7 ms into a reused one). The solver hands back what it knows is dead (:meth:`give`);
    :meth:`take` reuses a buffer of that exact shape or allocates. Buffers of one shape
    only are kept: a new shape (the stacked problems done, fewer positions active) drops
    the others, so the pool never holds more than the loop's few dead potentials.
    """

    def __init__(self):
        self._free: list[torch.Tensor] = []

    def take(self, like: torch.Tensor) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device:
                return self._free.pop(i)
        self._free.clear()
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    def give(self, *dead: torch.Tensor) -> None:
        self._free.extend(t for t in dead if t.is_contiguous())


class _Solver:
    """Sinkhorn loops on a chunk of r positions for one log-kernel ``lk(h, eps, rows)``.

    Every tensor is (positions, tokens) with positions on axis ``pos``: 0 for the support
    mode's (n, s) problems, 1 for the full vocabulary's token-major (V, n) potentials.
    ``lk`` maps log-weights ``h`` to ``log Σ_j exp(h_j − C_ij/ε)`` in that layout;
    ``rows (n,)`` names the position (0..r-1) each input position belongs to (only a
    per-position cost, the support mode's, needs it).
    """

    def __init__(self, lk: Callable, eps_list: list[float], max_iter: int, tol: float, pos: int = 0,
                 check_every: int = 1):
        self.lk, self.eps_list, self.max_iter, self.tol = lk, eps_list, max_iter, tol
        self.pos, self.tokens, self.check_every = pos, 1 - pos, check_every
        self.iterations = 0  # kernel applications per row, for the record
        self.pool = _Pool()

    def checks(self, it: int, count: int) -> bool:
        """Whether iteration ``it`` of ``count`` measures the marginal error: every
        ``check_every``-th and the last. (On the full vocabulary the error's exp and six
        other passes cost a fifth of an iteration; checking every other iteration costs at
        most one iteration more.)"""
        return (it + 1) % self.check_every == 0 or it == count - 1

    def positions(self, x: torch.Tensor) -> int:
        return x.shape[self.pos]

    def cat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Problems stacked along the positions."""
        return torch.cat(xs, self.pos)

    def split(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        return x.chunk(k, self.pos)

    def taker(self, active: torch.Tensor, n: int) -> Callable:
        """``x ↦`` the positions ``active`` of x, or ``x`` itself (no copy) while all are."""
        return (lambda x: x) if active.numel() == n else (lambda x: x.index_select(self.pos, active))

    def put(self, x: torch.Tensor, active: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``x`` with positions ``active`` set to ``value``: ``value`` itself when that is all.
        Whichever of the two is no longer needed goes back to the pool (both are the
        solver's own)."""
        if active.numel() == self.positions(x):
            self.pool.give(x)
            return value
        x = x.index_copy_(self.pos, active, value)
        self.pool.give(value)
        return x

    def error(self, mass, old, new, eps) -> torch.Tensor:
        scratch = self.pool.take(new)
        err = _marginal_error(mass, old, new, eps, self.tokens, out=scratch)
        self.pool.give(scratch)
        return err

    def transform(self, log_w: torch.Tensor, pot: torch.Tensor, eps: float, rows: torch.Tensor) -> torch.Tensor:
        """``T_w(pot)_i = −ε·log Σ_j w_j exp((pot_j − C_ij)/ε)``; rows stacked freely.

        One tensor per call, from the pool (the sparse kernel writes its result over its
        input): at V = 100k fresh tensors page-fault, and that had cost more than the kernel."""
        h = torch.add(log_w, pot, alpha=1 / eps, out=self.pool.take(pot))
        return self.lk(h, eps, rows, out=h, scale=-eps)

    def anneal(self, log_w: torch.Tensor, pot: torch.Tensor, swap: bool, rows) -> torch.Tensor:
        """One averaged update per ε of the schedule but the last, for two problems stacked
        along the positions (one kernel call each): ``pot ← ½(pot + T_w(src))`` with
        ``src = pot``, or pot's two halves swapped when ``swap`` (each problem's potential
        from the other's). ``pot`` is the solver's own (it may go to the pool); returns the
        stacked result."""
        for eps in self.eps_list[:-1]:
            src = self.cat(self.split(pot, 2)[::-1]) if swap else pot
            new = self.transform(log_w, src, eps, rows).add_(pot).mul_(0.5)
            self.pool.give(pot, *([src] if swap else []))
            pot = new
            self.iterations += 1
        return pot

    def symmetric(self, a, log_a, f, rows) -> tuple[torch.Tensor, float]:
        """Potential of OT_ε(a, a): the fixed point of ``f ← ½(f + T_a(f))``, from ``f``
        (the solver's own: it is updated, and may go to the pool).

        Returns ``(f, error)``; f is the last averaged iterate."""
        eps, n = self.eps_list[-1], self.positions(f)
        err = torch.zeros(n, dtype=f.dtype, device=f.device)
        active = torch.arange(n, device=f.device)
        for it in range(self.max_iter):
            take = self.taker(active, n)
            fa = take(f)
            tf = self.transform(take(log_a), fa, eps, rows[active])
            self.iterations += 1
            check = self.checks(it, self.max_iter)
            if check:
                err[active] = e = self.error(take(a), fa, tf, eps)
            f = self.put(f, active, tf.add_(fa).mul_(0.5))
            if check:
                active = active[e > self.tol]
                if active.numel() == 0:
                    break
        return f, float(err.max()) if err.numel() else 0.0

    def pair(self, a, b, log_a, log_b, g, rows) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Potentials of OT_ε(a, b) by alternating updates from the warm start ``g``.

        Returns ``(f, g, error)`` with ``g = T_a(f)`` exactly, so the plan's column
        marginal is b and ``⟨a, f⟩ + ⟨b, g⟩`` is the dual objective at that pair."""
        eps, n = self.eps_list[-1], self.positions(g)
        g = g.clone()
        f = self.transform(log_b, g, eps, rows)
        g = self.transform(log_a, f, eps, rows)
        self.iterations += 1
        err = torch.zeros(n, dtype=f.dtype, device=f.device)
        active = torch.arange(n, device=f.device)
        for it in range(self.max_iter - 1):
            take = self.taker(active, n)
            fn = self.transform(take(log_b), take(g), eps, rows[active])
            check = self.checks(it, self.max_iter - 1)
            if check:
                err[active] = e = self.error(take(a), take(f), fn, eps)
            self.iterations += 1
            gn = self.transform(take(log_a), fn, eps, rows[active])
            f = self.put(f, active, fn)  # after gn: put may hand fn to the pool
            g = self.put(g, active, gn)
            if check:
                active = active[e > self.tol]
                if active.numel() == 0:
                    break
        return f, g, float(err.max()) if err.numel() else 0.0


class _NewtonSolver(_Solver):
    """The solver for small dense problems (support mode): the pair OT_ε(a, b) by Newton's
    method (:func:`~._newton.newton_pair`, tens of steps where alternating updates need
    hundreds to thousands at small ε); the ε schedule and the symmetric problems, which converge in a few
    averaged updates, as in :class:`_Solver`. ``lk`` is a :class:`_DenseLogKernel`."""

    def pair(self, a, b, log_a, log_b, g, rows) -> tuple[torch.Tensor, torch.Tensor, float]:
        eps = self.eps_list[-1]
        f, g, err, steps = newton_pair(
            lambda log_w, pot, active: self.transform(log_w, pot, eps, rows[active]),
            lambda active: self.lk.neg_cost(eps, rows[active]),
            a, b, log_a, log_b, g, eps, self.tol, self.max_iter,
        )
        self.iterations += steps
        return f, g, float(err.max()) if err.numel() else 0.0


def _solve_chunk(solver: _Solver, p: torch.Tensor, q: torch.Tensor, debias: bool):
    """Value and ``∂/∂p`` (up to a constant) of S_ε (or OT_ε) for a chunk of positions
    (``p``, ``q`` and ``∂/∂p`` in the solver's layout)."""
    log_p, log_q = _log_probs(p), _log_probs(q)
    rows = torch.arange(solver.positions(p), device=p.device)
    rows2 = rows.repeat(2)
    shape = list(p.shape)
    shape[solver.pos] *= 2
    zeros = p.new_zeros(shape)
    info: dict = {}
    if debias:
        # anneal the self-transport potentials f_pp, g_qq (each updated from itself); the
        # pair then starts from g_qq, so only two problems pay the ε schedule
        log_pq = solver.cat([log_p, log_q])
        both = solver.anneal(log_pq, zeros, False, rows2)
        both, err_sym = solver.symmetric(solver.cat([p, q]), log_pq, both, rows2)
        fpp, gqq = solver.split(both, 2)
        info["marginal_error_sym"] = err_sym
        g = gqq  # warm start from OT(q, q)'s potential: the solution itself when p = q
    else:  # f ← T_q(g), g ← T_p(f): the pair's ε schedule, from g's end
        f, g = solver.split(solver.anneal(solver.cat([log_q, log_p]), zeros, True, rows2), 2)
    f, g, err = solver.pair(p, q, log_p, log_q, g, rows)
    info["marginal_error"] = err
    tokens = solver.tokens
    value = (p * f).sum(tokens) + (q * g).sum(tokens)
    grad = f
    if debias:  # OT(a, a) = 2⟨a, f_aa⟩
        value = value - (p * fpp).sum(tokens) - (q * gqq).sum(tokens)
        grad = f - fpp
    info["iterations"] = solver.iterations
    return value, grad, info


# -- support mode --------------------------------------------------------------------------
def _support_problem(p, q, m, op_index, op_costs, cap, embeddings, slots=None):
    """Masses ``(a, b) (r, s)``, cost ``(r, s, s)``, token ids ``(r, s−1)`` and a duplicate
    mask for the support top-m(p) ∪ top-m(q) + a rest bin (the last point), s = 2m + 1.

    ``op_index (V, k)`` (−1: empty) and ``op_costs`` are the symmetric operator's tables;
    ``slots`` (r, V) int32, all −1 (and left so), is scratch for their lookup."""
    rows, V = p.shape
    m = min(m, V)
    ids = torch.cat([p.topk(m, -1).indices, q.topk(m, -1).indices], -1).sort(-1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    s1 = ids.shape[1]
    a = torch.where(dup, 0.0, p.gather(1, ids))
    b = torch.where(dup, 0.0, q.gather(1, ids))
    a = torch.cat([a, (1 - a.sum(-1, keepdim=True)).clamp_min(0)], -1)
    b = torch.cat([b, (1 - b.sum(-1, keepdim=True)).clamp_min(0)], -1)
    if embeddings is not None:
        pts = embeddings[ids].to(p.dtype)
        inner = torch.cdist(pts, pts).clamp(max=cap)
    else:
        # each stored neighbour's slot in the support (the first of equal ids, the one that
        # is not a duplicate), −1 off it: looked up in the slot map, set here and reset after
        nb = op_index[ids]  # (rows, s1, k), −1 = empty
        flat_map = slots.view(-1)
        at = (ids + V * torch.arange(rows, device=p.device)[:, None])[~dup]
        flat_map[at] = torch.arange(s1, dtype=torch.int32, device=p.device).expand(rows, -1)[~dup]
        offset = (V * torch.arange(rows, device=p.device))[:, None, None]
        slot = flat_map[nb.clamp(min=0) + offset].long()
        flat_map[at] = -1
        slot = torch.where((nb >= 0) & (slot >= 0), slot, s1)  # s1: a spare column, dropped
        inner = torch.full((rows, s1, s1 + 1), cap, dtype=p.dtype, device=p.device)
        inner.scatter_(2, slot, op_costs[ids].to(p.dtype))
        inner = inner[:, :, :s1]
    cost = torch.full((rows, s1 + 1, s1 + 1), cap, dtype=p.dtype, device=p.device)
    cost[:, :s1, :s1] = inner
    cost.diagonal(dim1=1, dim2=2).zero_()
    return a, b, cost, ids, dup


# -- the module ----------------------------------------------------------------------------
class SinkhornDivergence(Penalty):
    """Debiased Sinkhorn divergence ``S_ε(p, q)`` per position, on a truncated ground cost.

    .. math::

        S_ε(p, q) = OT_ε(p, q) − ½OT_ε(p, p) − ½OT_ε(q, q),\\qquad
        OT_ε(p, q) = \\min_{P ∈ Π(p, q)} ⟨P, C⟩ + ε·KL(P ‖ p⊗q) = ⟨p, f⟩ + ⟨q, g⟩.

    Parameters
    ----------
    op : CostOperator
        The truncated cost (k neighbours per token, ``cap`` elsewhere, 0 on the diagonal).
        Debiasing needs a symmetric cost: an asymmetric (kNN) operator is symmetrized
        (``op.symmetrized()``: the union of both directions, the smaller cost where both
        are stored) and a log line says so; an already symmetric operator is used as is.
        ``symmetrize=False`` raises on an asymmetric operator instead.
    eps : float
        Entropic regularization ε, in the units of the cost (stable down to 0.01·cap in
        float32).
    max_iter : int
        Most Sinkhorn iterations per problem and chunk at the target ε (the ε-scaling
        steps, about log2(cap/ε), come on top); in support mode it also bounds the pair's
        Newton steps.
    tol : float
        Stop a position when the L1 marginal error ``‖P 1 − p‖₁`` of its plan is below
        this. float32 floors near 1e-6; ``max_iter`` then ends the loop.
    debias : bool
        Return S_ε (default) or the biased OT_ε(p, q).
    support : int, optional
        None: full vocabulary, O(V·k) per position and iteration. ``m``: the support
        top-m(p) ∪ top-m(q) plus a rest bin at cost ``cap``, O(m²) per position and
        iteration. Exact when p and q put all their mass on their top m tokens.
    embeddings : array-like, shape (V, d), optional
        Support mode only: the cost between support tokens is ``min(‖e_i − e_j‖₂, cap)``,
        exact instead of truncated (the ``l2`` metric).
    eps_scaling : float
        Ratio of the geometric ε annealing from ``cap`` down to ``eps`` (0 disables it).
    chunk_size : int, optional
        Positions solved together; default: as many as fit ``CHUNK_BYTES`` (128 MiB) of
        scratch (``GPU_CHUNK_BYTES``, 4 GiB, on a GPU), so extra memory is O(chunk·V·k),
        never O(N·V·k).

    Shapes
    ------
    ``forward(logits [..., V], ref)`` → ``[...]``, where ``ref`` is reference logits
    ``[..., V]`` or a top-k pair ``(ids [..., m], logprobs [..., m])``
    (see :func:`~vocabmetric.regularizers._inputs.reference_probs`). Computed in float64
    for float64 logits, else float32; the value has the logits' dtype.

    Cost: full mode O(N·V·k) per iteration (about 3 kernel applications per iteration:
    the pair and the two symmetric problems); support mode O(N·V) to pick the supports and
    write the gradient, O(N·m²) per update of the symmetric problems and O(N·m³) per
    Newton step of the pair (tens of steps; alternating updates for m > 128).

    Gradient: ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)``, ``h = f_pq − f_pp`` (envelope theorem); 0 at p = q.
    After each call, ``last_info`` holds the kernel applications per row (``iterations``,
    ε-scaling included, summed over the problems) and the final marginal errors.

    Examples
    --------
    >>> reg = SinkhornDivergence(store.operator("knn"), eps=0.05, support=64)  # doctest: +SKIP
    >>> loss = aggregate(reg(policy_logits, ref_logits), mask)                 # doctest: +SKIP
    """

    name = "sinkhorn"
    takes_metric = True

    def __init__(
        self,
        op: CostOperator,
        *,
        eps: float = 0.1,
        max_iter: int = 100,
        tol: float = 1e-6,
        debias: bool = True,
        support: int | None = None,
        embeddings: Any = None,
        symmetrize: bool = True,
        eps_scaling: float = 0.5,
        chunk_size: int | None = None,
    ):
        super().__init__()
        where = "SinkhornDivergence"
        if not isinstance(op, CostOperator):
            raise self.config_error(f"op must be a CostOperator, got {type(op).__name__}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise self.config_error(f"eps must be finite and > 0, got {eps!r}")
        if eps < 0.01 * op.cap * (1 - 1e-9):
            LOG.warning("%s: eps=%g is below 0.01·cap=%g; float32 may lose accuracy", where, eps, 0.01 * op.cap)
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise self.config_error(f"max_iter must be an int >= 1, got {max_iter!r}")
        if not tol > 0:
            raise self.config_error(f"tol must be > 0, got {tol!r}")
        if support is not None and not (isinstance(support, int) and support >= 1):
            raise self.config_error(f"support must be None or an int >= 1, got {support!r}")
        self._configure(chunk_size=chunk_size)
        if not op.is_symmetric:
            if not symmetrize:
                raise self.config_error(
                    f"the cost operator {op} is not symmetric, and debiasing needs a "
                    "symmetric cost; pass symmetrize=True or op.symmetrized()"
                )
            LOG.info("%s: symmetrizing %s (cost(i,j) = cost(j,i) = the smaller stored cost)", where, op)
            op = op.symmetrized()
        self.op = op
        self.eps, self.max_iter, self.tol, self.debias = float(eps), int(max_iter), float(tol), bool(debias)
        self.support, self.eps_scaling = support, float(eps_scaling)
        self.embeddings = None if embeddings is None else torch.as_tensor(np.asarray(embeddings, np.float32))
        if self.embeddings is not None and self.embeddings.shape[0] != op.vocab_size:
            raise self.config_error(
                f"embeddings have {self.embeddings.shape[0]} rows, the operator {op.vocab_size}"
            )
        self.last_info: dict = {}
        self._kernels: dict = {}
        self._warned = False

    @classmethod
    def from_store(cls, store: Any, metric: str = "knn", **kw) -> "SinkhornDivergence":
        """Build from a :class:`~vocabmetric.store.MetricStore`'s ``metric`` operator
        (symmetrized if it is not symmetric, as in the constructor).

        For ``metric="l2"`` in support mode the support costs are computed exactly from the
        store's embeddings, normalized to unit length (the l2 metric's normalized Euclidean
        distance).
        """
        op = store.operator(metric)
        if metric == "l2" and kw.get("support") is not None and "embeddings" not in kw:
            kw["embeddings"] = np.asarray(store.embeddings(normalized=True), np.float32)
        return cls(op, **kw)

    @property
    def vocab_size(self) -> int:
        return self.op.vocab_size

    @property
    def fingerprint(self) -> str | None:
        """The tokenizer fingerprint of the cost operator (None if unknown)."""
        return self.op.fingerprint

    def extra_repr(self) -> str:
        return f"{self.op!r}, eps={self.eps}, support={self.support}, debias={self.debias}"

    def _kernel(self, device, dtype) -> _SparseLogKernel:
        key = (str(device), dtype)
        if key not in self._kernels:
            self._kernels[key] = _SparseLogKernel(self.op, device, dtype)
        return self._kernels[key]

    def _torch_table(self, device):
        key = (str(device), "table")
        if key not in self._kernels:
            self._kernels[key] = (
                torch.as_tensor(self.op.indices, dtype=torch.int64, device=device),
                torch.as_tensor(self.op.costs, device=device),
            )
        return self._kernels[key]

    def forward(self, logits: torch.Tensor, ref: Reference, *, fingerprint: str | None = None) -> torch.Tensor:
        """Per-position divergence ``[...]`` between ``softmax(logits)`` and the reference."""
        where = "SinkhornDivergence"
        self.check_logits(logits, fingerprint)
        # NaN or +inf inputs make the value NaN, and solve_by_chunks names them then: valid
        # inputs pay no extra pass (a NaN position leaves the solver at its first check)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        V = self.vocab_size
        eps_list = _eps_schedule(self.eps, self.op.cap, self.eps_scaling)
        item = torch.finfo(dtype).bits // 8
        budget = GPU_CHUNK_BYTES if logits.device.type == "cuda" else CHUNK_BYTES
        kernel = None
        if self.support is None:
            kernel = self._kernel(logits.device, dtype)
            if kernel.path != "torch":
                # the fused kernels: ~16 (V,) vectors per row (4 stacked problems' potentials,
                # weights and scratch); more rows per call amortize table reads
                per_row = 16 * V * item
                budget = max(budget, FUSED_CHUNK_BYTES)
            else:  # 4 stacked problems while annealing, each a (V, width) gathered block
                per_row = 4 * V * kernel.width * item
        else:
            s = 2 * min(self.support, V) + 1
            per_row = 4 * s * s * item + 4 * V * item  # 4 problems' costs; the chunk's (V,) rows
            if self.embeddings is None:
                per_row += 4 * V  # the support's slot map (int32)
        rows = self.chunk_size or max(1, int(budget // per_row))
        if self.chunk_size is None and kernel is not None and kernel.path == "numba" and rows > FUSED_CHUNK_ALIGN:
            rows -= rows % FUSED_CHUNK_ALIGN
        infos: list[dict] = []
        scratch: dict = {}

        def chunk(p, q, value_out, dz_out) -> None:
            q = q.div_(q.sum(-1, keepdim=True))  # p and q must carry the same mass exactly
            if self.support is not None:  # writes dz_out itself, from the support's potentials
                value, info = self._support_chunk(p, q, eps_list, dz_out, scratch)
            else:  # token-major (V, rows) in the kernel's token order: one copy each way
                order, rank = kernel.permutation
                p, q = (x.index_select(1, order).t().contiguous() for x in (p, q))
                solver = _Solver(kernel, eps_list, self.max_iter, self.tol, pos=1, check_every=2)
                value, h, info = _solve_chunk(solver, p, q, self.debias)
                if dz_out is not None:  # ∂S/∂z = p ⊙ (h − ⟨p, h⟩); a zero-mass token gets none, even if h is huge
                    h = h.masked_fill_(p <= 0, 0.0)  # h is the chunk's own: in place
                    h.sub_(torch.einsum("ji,ji->i", p, h)).mul_(p)
                    torch.index_select(h.t().contiguous(), 1, rank, out=dz_out)
            infos.append(info)
            value_out.copy_(value)

        try:
            out = solve_by_chunks(logits, ref, chunk, chunk_size=rows, dtype=dtype, where=where)
        finally:
            if kernel is not None:
                kernel.release()
        self.last_info = {key: max(i[key] for i in infos) for key in infos[0]} if infos else {}
        self.last_info.update(chunks=len(infos), eps=self.eps, mode="full" if self.support is None else "support")
        self._warn_unconverged()
        return out.to(logits.dtype)

    def _warn_unconverged(self) -> None:
        """Say once per instance when ``max_iter`` ended the loop far from ``tol``: the value
        is then off by up to about (marginal error × cap), and the gradient with it."""
        err = max(self.last_info.get("marginal_error", 0.0), self.last_info.get("marginal_error_sym", 0.0))
        if err > max(100 * self.tol, 1e-3) and not self._warned:
            self._warned = True
            LOG.warning("SinkhornDivergence: max_iter=%d stopped positions at an L1 marginal error of %.2g "
                        "(tol %g); the value may be off by up to ≈ %.2g × cap. Raise max_iter or eps "
                        "(last_info has the errors; this is said once)", self.max_iter, err, self.tol, err)

    def _support_chunk(self, p, q, eps_list, dz_out, scratch):
        """Value and info of a chunk in support mode; ``∂S/∂z`` into ``dz_out`` (rows, V) if given.

        Every token outside the support sits in the rest bin, so the potential ``h`` on the
        vocabulary is the bin's there and ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` is one scaling of
        ``p`` plus the support's 2m entries: no (rows, V) potential is built."""
        rows, V = p.shape
        emb = None if self.embeddings is None else self.embeddings.to(p.device)
        slots = None
        if emb is None:  # the slot map, −1 off the support: made once per forward
            if scratch.get("slots") is None or scratch["slots"].shape[0] < rows:
                scratch["slots"] = torch.full((rows, V), -1, dtype=torch.int32, device=p.device)
            slots = scratch["slots"][:rows]
        index, costs = self._torch_table(p.device)
        a, b, cost, ids, dup = _support_problem(p, q, self.support, index, costs, self.op.cap, emb, slots)
        kind = _NewtonSolver if cost.shape[-1] <= NEWTON_MAX_POINTS else _Solver
        solver = kind(_DenseLogKernel(cost), eps_list, self.max_iter, self.tol)
        value, f_small, info = _solve_chunk(solver, a, b, self.debias)
        if dz_out is not None:
            # a duplicate (zero-mass) point follows its original in the sorted support and
            # takes the original's potential; a token without mass gets no gradient
            rest, f_ids = f_small[:, -1:], f_small[:, :-1]
            f_ids = torch.where(dup, f_ids.roll(1, -1), f_ids)
            p_ids = p.gather(1, ids)
            p_once = torch.where(dup, 0.0, p_ids)
            mean = rest * (1 - p_once.sum(-1, keepdim=True)) + (p_once * f_ids).sum(-1, keepdim=True)
            torch.mul(p, rest - mean, out=dz_out)
            dz_out.scatter_(1, ids, torch.where(p_ids > 0, p_ids * (f_ids - mean), 0.0))
        return value, info
