"""The sparse log-domain kernel of the full-vocabulary Sinkhorn: one application of the Gibbs
kernel of a truncated kNN cost, ``h ↦ log Σ_j exp(h_j − C_ij/ε)``, O(V·k) per position.

The cost is the truncated :class:`~vocabmetric.cost.CostOperator` (k neighbours,
``cap`` elsewhere, 0 on the diagonal), so ``K = exp(−cap/ε)·11ᵀ + S`` with
``S_ij = exp(−c_ij/ε) − exp(−cap/ε) ≥ 0`` on the stored entries and the diagonal::

    log(K w)_i = logaddexp(−cap/ε + LSE_j h_j,
                           LSE_{j∈N(i)} [h_j − c_ij/ε + log1mexp((cap − c_ij)/ε)])

Three backends read one CSR table of the operator: a fused numba kernel on CPU (linear
domain, log-domain fallback), a Triton kernel on CUDA (:mod:`.triton_kernels`, exact log domain)
and a torch path anywhere (rows gathered by degree bucket).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np
import torch

from ..._util.jit import compile_once
from ...cost import CostOperator
from ._logspace import FLOOR, LINEAR_RANGE, NEG_INF, log1mexp, lse_, per_eps
from .._numba import prefetch, run_rows
from .triton_kernels import padded_rows, sparse_lse_kernel

LOG = logging.getLogger(__name__)

#: Scratch memory for one chunk of positions on the fused CPU kernel (16 (V,)-vectors per
#: position: 4 stacked problems' potentials, weights and scratch): a chunk of 64–128
#: positions amortizes each stored entry's index and weight over as many multiply-adds
#: (per position 1.3× faster at 80 than at 20, V = 100k). The chunk is rounded down to a
#: multiple of ``FUSED_CHUNK_ALIGN`` positions: torch's column max over a (V, n) tensor
#: takes 1 ms at n = 64 and 6 ms at n = 80 (its fast path wants n a multiple of 32).
FUSED_CHUNK_BYTES = 512 * 2**20
FUSED_CHUNK_ALIGN = 32


def degree_widths(width: int) -> list[int]:
    """Bucket widths 1, 2, 4, 8, 12, 16, 24, 32, 48, … up to ``width`` (padding ≤ 1.5×)."""
    out, w = [1, 2, 4], 8
    while out[-1] < width:
        out += [w, w * 3 // 2]
        w *= 2
    return sorted({min(x, width) for x in out})


def csr_table(index: np.ndarray, costs: np.ndarray, cap: float) -> tuple:
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


class SparseLogKernel:
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
        self.order = locality_order(*csr_table(index, costs, op.cap)[:2])
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(V)
        #: ``(indptr, nbr, costs)`` in the kernel's token order (see :func:`csr_table`)
        self.csr = csr_table(self.rank[index[self.order]], costs[self.order], op.cap)
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
        indptr, nbr, costs = self.csr
        degree = np.diff(indptr)  # ≥ 1: the row itself
        out, lo = [], 0
        for w in degree_widths(int(degree.max())):
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
        return per_eps(self._tables, eps, lambda: [
            torch.nan_to_num(log1mexp((self.cap - c).clamp_min(0) / eps) - c / eps, nan=NEG_INF)
            .to(self.dtype)
            .contiguous()
            for _, _, c, _ in self.buckets
        ])

    @property
    def path(self) -> str:
        """The path that runs on this kernel's device: ``"numba"`` (CPU, with numba),
        ``"triton"`` (CUDA, with Triton) or ``"torch"`` (the gathered blocks, anywhere)."""
        kind = torch.device(self.device).type
        if kind == "cpu" and numba_sparse_lse() is not None:
            return "numba"
        if kind == "cuda" and sparse_lse_kernel() is not None:
            return "triton"
        return "torch"

    def __call__(self, h: torch.Tensor, eps: float, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """``scale ×`` the log-kernel of ``h (V, n)``, token-major (on the kernel's device);
        ``out`` (may be ``h`` itself) receives it if given."""
        if self.path == "numba":
            return self.fused(h, eps, out, scale)
        result = self.triton(h, eps, out) if self.path == "triton" else self.gathered(h, eps, out)
        return result if scale == 1.0 else result.mul_(scale)

    def triton(self, h: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """The GPU path: the Triton kernel over the CSR table (see :mod:`.triton_kernels`), reading
        a copy of ``h (V, n)`` with 64-byte aligned rows (``out`` may be ``h`` itself)."""
        indptr, nbr, log_k = self.csr_tensors(eps)
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
    def csr_torch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CSR table ``(indptr, nbr, costs)`` as torch tensors on the kernel's device
        (the heavy-token block solve's, :mod:`._heavy`)."""
        return tuple(torch.as_tensor(x, device=self.device) for x in self.csr)

    @functools.cached_property
    def _device_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CSR table's ``(indptr, nbr)`` on the kernel's device (the GPU path's)."""
        indptr, nbr, _ = self.csr
        return torch.as_tensor(indptr, device=self.device), torch.as_tensor(nbr, device=self.device)

    def csr_tensors(self, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indptr, nbr, log_k)`` on the kernel's device; ``log_k`` in the compute dtype, per ε."""
        log_k = per_eps(self._device_log_k, eps, lambda: torch.as_tensor(
            self.csr_weights(eps)[0], device=self.device).to(self.dtype))
        return (*self._device_csr, log_k)

    def gathered(self, h: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
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
            lse = lse_(block)
            if lse_all is None:
                lse_all = lse
            else:
                lse_all.index_copy_(1, ids, lse)
        dense = lse_(h.clone()).unsqueeze_(-1) - self.cap / eps
        return torch.logaddexp(lse_all, dense)

    def fused(self, h: torch.Tensor, eps: float, out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
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
        indptr, nbr, _ = self.csr
        floor, accept = LINEAR_RANGE[self.dtype]
        log_k, k = self.csr_weights(eps)
        h = h.detach().to(self.dtype)
        V, n = h.shape
        top = h.amax(0)
        finite = torch.isfinite(top)
        top = torch.where(finite, top, 0.0)
        shifted, e_t = self._scratch(n)  # (V, n), reused: see release(); ``out`` may be ``h``
        torch.sub(h, top, out=shifted)  # shifted log-weights (−inf kept for the fallback)
        torch.clamp(shifted, min=floor, out=e_t).exp_()
        # every position's dense term: −cap/ε + LSE_j h_j − m_r = −cap/ε + log Σ_j E[j, r]
        dense = torch.where(finite, e_t.sum(0).log_(), NEG_INF).double() - self.cap / eps
        base = dense.clamp(min=floor).exp().to(self.dtype)
        if out is None or out.dtype != self.dtype or not out.is_contiguous():
            out = torch.empty_like(h)  # (V, n)
        sparse_sum, log_domain = numba_sparse_lse()
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
        indptr, nbr, _ = self.csr
        rows = np.repeat(np.arange(self.vocab_size), np.diff(indptr))
        far = np.abs(nbr.astype(np.int64) - rows) > 4096
        return np.logical_or.reduceat(far, indptr[:-1]).astype(np.int32)

    def _scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (V, n) buffers for the fused path (the shifted input and its exp), kept until
        :meth:`release` (a Sinkhorn solve calls the kernel hundreds of times, and a fresh
        25–50 MB tensor costs thousands of page faults each time)."""
        size = self.vocab_size * n
        if self._buffers is None or self._buffers.shape[1] < size:
            self._buffers = torch.empty(2, size, dtype=self.dtype, device=self.device)
        return tuple(b[:size].view(self.vocab_size, n) for b in self._buffers)

    def release(self) -> None:
        """Free the fused path's scratch (the module calls it after each forward)."""
        self._buffers = None

    def csr_weights(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """The fused path's per-ε weights: float64 ``log K`` (for the log-domain fallback)
        and ``K = exp(max(log K, floor))`` in the compute dtype, one per CSR entry."""
        def make():
            c = self.csr[2]
            log_k = np.nan_to_num(log1mexp(torch.from_numpy((self.cap - c) / eps)).numpy() - c / eps,
                                  nan=NEG_INF)
            k = np.exp(np.maximum(log_k, LINEAR_RANGE[self.dtype][0]))
            return log_k, k.astype(np.float32 if self.dtype == torch.float32 else np.float64)

        return per_eps(self._weights, eps, make)


@compile_once
def numba_sparse_lse(numba):
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
                total = np.exp(dense[r] - top) if dense[r] - top > FLOOR else 0.0
                for t in range(indptr[i], indptr[i + 1]):
                    v = np.float64(h[nbr[t], r]) + log_k[t] - top
                    if v > FLOOR:
                        total += np.exp(v)
                row_out[r] = top + np.log(total)

    return sparse_sum, log_domain
