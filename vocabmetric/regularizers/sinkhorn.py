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

  with ``h_j = log w_j`` (``= log q_j + g_j/ε`` in a Sinkhorn update): one gather over the
  (V, k) table and a few reductions, O(V·k) per position, never O(V²).
* **Support** (``support=m``). Per position the support is top-m(p) ∪ top-m(q) plus one
  "rest" bin holding the remaining mass at cost ``cap`` from every other point; the
  (2m+1)² cost sub-matrix is gathered from the operator (or computed from embeddings).
  O(m²) per position and iteration: the practical mode for training.

The potentials solve, in the log domain (stable in float32 down to ε = 0.01·cap),
``f_i = −ε·log Σ_j q_j exp((g_j − C_ij)/ε)`` and ``g_j = −ε·log Σ_i p_i exp((f_i − C_ij)/ε)``;
the symmetric terms use the averaged update ``f ← ½(f + T_p(f))``. ε is annealed
geometrically from ``cap`` down to its target (ε-scaling), the symmetric problems are
solved first and warm-start ``OT_ε(p, q)``, and positions leave the active set as soon as
their marginal error is below ``tol``.

Gradient (envelope theorem, never backpropagation through the iterations):
``∂S/∂p = f_pq − f_pp`` (defined up to a constant) and, through the softmax,
``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` with ``h = f_pq − f_pp``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import VocabMetricError
from ..operator import CostOperator
from ._inputs import Reference, check_finite, check_width, reference_probs

LOG = logging.getLogger(__name__)

#: Default scratch memory for one chunk of positions (the gathered (chunk, V, k) block).
CHUNK_BYTES = 256 * 2**20

_NEG_INF = float("-inf")


# -- log-domain kernels --------------------------------------------------------------------
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(−x))`` for ``x ≥ 0``, accurate at both ends (Mächler 2012); −inf at 0."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


class _SparseLogKernel:
    """``h ↦ log Σ_j exp(h_j − C_ij/ε)`` for a symmetric truncated cost, O(V·k) per row.

    Holds the operator as an ELL table with the diagonal as an extra first column (cost 0)
    and empty slots pointing at the row itself with weight −inf. The per-ε table
    ``−c/ε + log1mexp((cap − c)/ε)`` is cached, so an ε schedule is paid once per module.
    """

    def __init__(self, op: CostOperator, device: Any, dtype: torch.dtype):
        V = op.vocab_size
        rows = np.arange(V, dtype=np.int64)[:, None]
        valid = op.indices >= 0
        index = np.where(valid & (op.indices != rows), op.indices, rows)
        costs = np.where(index != rows, op.costs, op.cap)  # empty or self-listed slot: cap, weight 0
        self.index = torch.as_tensor(np.concatenate([rows, index], 1), device=device).contiguous()
        self.costs = torch.as_tensor(
            np.concatenate([np.zeros((V, 1), np.float32), costs], 1), dtype=torch.float64, device=device
        )
        self.flat_index = self.index.reshape(-1)
        self.cap = op.cap
        self.vocab_size, self.width = self.index.shape
        self.dtype = dtype
        self._tables: dict[float, torch.Tensor] = {}

    def table(self, eps: float) -> torch.Tensor:
        if eps not in self._tables:
            excess = _log1mexp((self.cap - self.costs) / eps) - self.costs / eps
            self._tables[eps] = excess.to(self.dtype).contiguous()
            if len(self._tables) > 32:  # schedules are short; keep memory bounded anyway
                self._tables.pop(next(iter(self._tables)))
        return self._tables[eps]

    def __call__(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        rows = h.shape[0]
        dense = torch.logsumexp(h, -1) - self.cap / eps
        block = torch.index_select(h, 1, self.flat_index).view(rows, self.vocab_size, self.width)
        block += self.table(eps)
        sparse = torch.logsumexp(block, -1)
        return torch.logaddexp(dense[:, None], sparse)


class _DenseLogKernel:
    """``h ↦ log Σ_j exp(h_j − C_ij/ε)`` for a batch of small dense costs (rows, s, s)."""

    def __init__(self, cost: torch.Tensor):
        self.cost = cost

    def __call__(self, h: torch.Tensor, eps: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        cost = self.cost if rows is None else self.cost[rows]
        return torch.logsumexp(h[:, None, :] - cost / eps, -1)


# -- the solver ----------------------------------------------------------------------------
def _eps_schedule(eps: float, cap: float, scaling: float) -> list[float]:
    """Geometric ε annealing from ``cap`` down to ``eps`` (the last entry is ``eps``)."""
    if not 0 < scaling < 1 or eps >= cap:
        return [eps]
    n = int(math.ceil(math.log(cap / eps) / -math.log(scaling)))
    return [max(cap * scaling**s, eps) for s in range(n)] + [eps]


def _marginal_error(log_mass: torch.Tensor, old: torch.Tensor, new: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row L1 marginal error ``Σ_j m_j |exp((old_j − new_j)/ε) − 1|`` (0 where m_j = 0)."""
    ratio = torch.expm1(((old - new) / eps).clamp(max=50.0)).abs()
    return torch.where(log_mass > _NEG_INF, log_mass.exp() * ratio, 0.0).sum(-1)


class _Solve:
    """Sinkhorn loops on a chunk of positions for one log-kernel ``lk(h, eps, rows)``.

    ``lk`` maps log-weights ``h (r, n)`` to ``log Σ_j exp(h_j − C_ij/ε)``; ``rows`` names the
    positions of the chunk the r rows belong to (only the support-mode kernel uses it).
    """

    def __init__(self, lk: Callable, eps_list: list[float], max_iter: int, tol: float):
        self.lk, self.eps_list, self.max_iter, self.tol = lk, eps_list, max_iter, tol

    def transform(self, log_w: torch.Tensor, pot: torch.Tensor, eps: float, rows: torch.Tensor) -> torch.Tensor:
        """``T(pot)_i = −ε·log Σ_j w_j exp((pot_j − C_ij)/ε)``."""
        return -eps * self.lk(log_w + pot / eps, eps, rows)

    def symmetric(self, log_a: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Potential of OT_ε(a, a): the fixed point of ``f ← ½(f + T_a(f))``.

        Returns ``(f, iterations, error)`` where f is ½(f + T_a(f)) at the final iterate.
        """
        rows = torch.arange(log_a.shape[0], device=log_a.device)
        f = torch.zeros_like(log_a)
        n_iter = 0
        for eps in self.eps_list[:-1]:  # annealing: one averaged step per ε
            f = 0.5 * (f + self.transform(log_a, f, eps, rows))
            n_iter += 1
        eps = self.eps_list[-1]
        err = torch.full((log_a.shape[0],), math.inf, dtype=log_a.dtype, device=log_a.device)
        active = rows
        while True:
            fa, la = f[active], log_a[active]
            tf = self.transform(la, fa, eps, active)
            n_iter += 1
            err[active] = _marginal_error(la, fa, tf, eps)
            f[active] = 0.5 * (fa + tf)
            active = active[err[active] > self.tol]
            if active.numel() == 0 or n_iter >= self.max_iter:
                return f, n_iter, float(err.max())

    def pair(self, log_a, log_b, f, g) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """Potentials of OT_ε(a, b) by alternating updates from the warm start ``(f, g)``.

        Returns ``(f, g, iterations, error)`` with ``f = T_b(g_prev)`` and ``g = T_a(f)``,
        so ``⟨a, f⟩ + ⟨b, g⟩`` is the exact dual objective at that pair.
        """
        rows = torch.arange(log_a.shape[0], device=log_a.device)
        eps = self.eps_list[-1]
        err = torch.full((log_a.shape[0],), math.inf, dtype=log_a.dtype, device=log_a.device)
        active, n_iter = rows, 0
        f, g = f.clone(), g.clone()
        while True:
            la, lb, ga = log_a[active], log_b[active], g[active]
            fa = self.transform(lb, ga, eps, active)
            gn = self.transform(la, fa, eps, active)
            n_iter += 1
            err[active] = _marginal_error(lb, ga, gn, eps)
            f[active], g[active] = fa, gn
            active = active[err[active] > self.tol]
            if active.numel() == 0 or n_iter >= self.max_iter:
                return f, g, n_iter, float(err.max())


def _log_probs(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p.clamp_min(torch.finfo(p.dtype).tiny).log(), _NEG_INF)


def _solve_chunk(solver: _Solve, p: torch.Tensor, q: torch.Tensor, debias: bool, cap: float):
    """Value and ``∂/∂p`` (up to a constant) of S_ε (or OT_ε) for a chunk of positions."""
    log_p, log_q = _log_probs(p), _log_probs(q)
    info = {}
    if debias:
        fp, ip, ep = solver.symmetric(log_p)
        gq, iq, eq = solver.symmetric(log_q)
        info = {"iterations_sym": max(ip, iq), "marginal_error_sym": max(ep, eq)}
        f0, g0 = fp, gq  # the self-transport potentials warm-start OT(p, q); exact when p = q
    else:
        f0 = g0 = torch.zeros_like(p)
        for eps in solver.eps_list[:-1]:  # no symmetric solutions to start from: anneal
            rows = torch.arange(p.shape[0], device=p.device)
            f0 = solver.transform(log_q, g0, eps, rows)
            g0 = solver.transform(log_p, f0, eps, rows)
    f, g, n_iter, err = solver.pair(log_p, log_q, f0, g0)
    info.update(iterations=n_iter, marginal_error=err)
    value = (p * f).sum(-1) + (q * g).sum(-1)
    grad = f
    if debias:
        rows = torch.arange(p.shape[0], device=p.device)
        eps = solver.eps_list[-1]
        fp2 = 0.5 * (fp + solver.transform(log_p, fp, eps, rows))
        gq2 = 0.5 * (gq + solver.transform(log_q, gq, eps, rows))
        value = value - (p * fp2).sum(-1) - (q * gq2).sum(-1)
        grad = f - fp2
    return value, grad, info


# -- support mode --------------------------------------------------------------------------
def _support_problem(p, q, m, table_index, table_costs, cap, embeddings):
    """Masses ``(a, b) (r, s)``, cost ``(r, s, s)``, token ids ``(r, s−1)`` and a duplicate
    mask for the support top-m(p) ∪ top-m(q) + a rest bin (the last point), s = 2m + 1."""
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
        # slot of each support token in a (rows, V + 1) map; column V collects duplicates
        # and empty neighbour slots, so a single scatter builds the sub-matrix
        slot = torch.full((rows, V + 1), -1, dtype=torch.int32, device=p.device)
        slot.scatter_(1, torch.where(dup, V, ids), torch.arange(s1, dtype=torch.int32, device=p.device).expand(rows, s1))
        slot[:, V] = -1
        nb = table_index[ids]  # (rows, s1, k), -1 = empty
        nb_slot = slot.gather(1, torch.where(nb >= 0, nb, V).view(rows, -1)).view(nb.shape).long()
        inner = torch.full((rows, s1, s1 + 1), cap, dtype=p.dtype, device=p.device)
        inner.scatter_(2, torch.where(nb_slot >= 0, nb_slot, s1), table_costs[ids].to(p.dtype))
        inner = inner[:, :, :s1]
    cost = torch.full((rows, s1 + 1, s1 + 1), cap, dtype=p.dtype, device=p.device)
    cost[:, :s1, :s1] = inner
    cost.diagonal(dim1=1, dim2=2).zero_()
    return a, b, cost, ids, dup


# -- the autograd function -----------------------------------------------------------------
class _SinkhornFunction(torch.autograd.Function):
    """Value of the solver's ``run(p)``; backward ``p ⊙ (h − ⟨p, h⟩)`` from its potential h."""

    @staticmethod
    def forward(ctx, logits, run):
        p = torch.softmax(logits.detach().to(run.dtype), -1)
        value, h = run(p)
        ctx.save_for_backward(p * (h - (p * h).sum(-1, keepdim=True)))
        return value.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_value):
        (dz,) = ctx.saved_tensors
        return (grad_value[..., None] * dz).to(grad_value.dtype), None


class SinkhornDivergence(nn.Module):
    """Debiased Sinkhorn divergence ``S_ε(p, q)`` per position, on a truncated ground cost.

    .. math::

        S_ε(p, q) = OT_ε(p, q) − ½OT_ε(p, p) − ½OT_ε(q, q),\\qquad
        OT_ε(p, q) = \\min_{P ∈ Π(p, q)} ⟨P, C⟩ + ε·KL(P ‖ p⊗q) = ⟨p, f⟩ + ⟨q, g⟩.

    Parameters
    ----------
    op : CostOperator
        The truncated cost (k neighbours per token, ``cap`` elsewhere, 0 on the diagonal).
        Debiasing needs a symmetric cost: an asymmetric (kNN) operator is symmetrized
        (``op.symmetrized()``: the smaller of the two directions), and a log line says so,
        unless ``symmetrize=False``, which raises instead.
    eps : float
        Entropic regularization ε, in the units of the cost (stable down to 0.01·cap in
        float32).
    max_iter : int
        Most Sinkhorn iterations per problem and chunk, ε-scaling steps included.
    tol : float
        Stop when the L1 marginal error ``‖P^T 1 − q‖₁`` of every position is below this.
        In float32 the error floors near 1e-5 at ε = 0.01·cap; ``max_iter`` then ends the loop.
    debias : bool
        Return S_ε (default) or the biased OT_ε(p, q).
    support : int, optional
        None: full vocabulary, O(V·k) per position and iteration. ``m``: the support
        top-m(p) ∪ top-m(q) plus a rest bin at cost ``cap``, O(m²) per position and iteration.
    embeddings : array-like, shape (V, d), optional
        Support mode only: the cost between support tokens is ``min(‖e_i − e_j‖₂, cap)``,
        exact instead of truncated (the ``l2`` metric).
    eps_scaling : float
        Ratio of the geometric ε annealing from ``cap`` down to ``eps`` (0 disables it).
    chunk_size : int, optional
        Positions solved together; default: as many as fit ``CHUNK_BYTES`` (256 MB) of
        scratch, so extra memory is O(chunk·V·k), never O(N·V·k).

    Shapes
    ------
    ``forward(logits [..., V], ref)`` → ``[...]``, where ``ref`` is reference logits
    ``[..., V]`` or a top-k pair ``(ids [..., m], logprobs [..., m])``
    (see :func:`~vocabmetric.regularizers._inputs.reference_probs`).

    Gradient: ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)``, ``h = f_pq − f_pp`` (envelope theorem); 0 at p = q.
    After each call, ``last_info`` holds the iteration counts and final marginal errors.

    Examples
    --------
    >>> reg = SinkhornDivergence(store.operator("knn"), eps=0.05, support=64)  # doctest: +SKIP
    >>> loss = (reg(policy_logits, ref_logits) * mask).sum() / mask.sum()      # doctest: +SKIP
    """

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
        if not isinstance(op, CostOperator):
            raise VocabMetricError(f"SinkhornDivergence: op must be a CostOperator, got {type(op).__name__}")
        if not (eps > 0 and math.isfinite(eps)):
            raise VocabMetricError(f"SinkhornDivergence: eps must be finite and > 0, got {eps}")
        if support is not None and support < 1:
            raise VocabMetricError(f"SinkhornDivergence: support must be None or >= 1, got {support}")
        if not op.is_symmetric:
            if not symmetrize:
                raise VocabMetricError(
                    "SinkhornDivergence: the cost operator is not symmetric, and debiasing needs a "
                    "symmetric cost; pass symmetrize=True or op.symmetrized()"
                )
            LOG.info("SinkhornDivergence: symmetrizing the %s (cost(i,j) = cost(j,i) = the smaller)", op)
            op = op.symmetrized()
        self.op = op
        self.eps, self.max_iter, self.tol, self.debias = float(eps), int(max_iter), float(tol), bool(debias)
        self.support, self.eps_scaling, self.chunk_size = support, float(eps_scaling), chunk_size
        self.embeddings = None if embeddings is None else torch.as_tensor(np.asarray(embeddings, np.float32))
        if self.embeddings is not None and self.embeddings.shape[0] != op.vocab_size:
            raise VocabMetricError(
                f"SinkhornDivergence: embeddings have {self.embeddings.shape[0]} rows, the operator {op.vocab_size}"
            )
        self.last_info: dict = {}
        self._kernels: dict = {}

    @classmethod
    def from_store(cls, store: Any, metric: str = "knn", **kw) -> "SinkhornDivergence":
        """Build from a :class:`~vocabmetric.store.MetricStore`'s ``metric`` operator.

        For ``metric="l2"`` in support mode the support costs are computed exactly from the
        store's embeddings, normalized to unit length (the l2 metric's normalized Euclidean
        distance).
        """
        op = store.operator(metric)
        if metric == "l2" and kw.get("support") is not None and "embeddings" not in kw:
            emb = np.asarray(store.embeddings(), np.float32)
            kw["embeddings"] = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return cls(op, **kw)

    @property
    def vocab_size(self) -> int:
        return self.op.vocab_size

    def extra_repr(self) -> str:
        return f"{self.op!r}, eps={self.eps}, support={self.support}, debias={self.debias}"

    def _tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._kernels:
            self._kernels[key] = _SparseLogKernel(self.op, device, dtype)
        return self._kernels[key]

    def forward(self, logits: torch.Tensor, ref: Reference, *, fingerprint: str | None = None) -> torch.Tensor:
        """Per-position divergence ``[...]`` between ``softmax(logits)`` and the reference."""
        where = "SinkhornDivergence"
        check_width(self.vocab_size, logits, where)
        self.op.check_vocab(logits.shape[-1], fingerprint, what=where)
        check_finite(logits, "policy logits", where)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        q = reference_probs(ref, logits, where).to(dtype)
        lead = logits.shape[:-1]
        V = self.vocab_size
        flat_q = q.reshape(-1, V)
        eps_list = _eps_schedule(self.eps, self.op.cap, self.eps_scaling)
        kernel = self._tables(logits.device, dtype)
        infos: list[dict] = []

        def run(p: torch.Tensor):
            flat_p = p.reshape(-1, V)
            n = flat_p.shape[0]
            value = torch.empty(n, dtype=dtype, device=p.device)
            grad = torch.empty_like(flat_p)
            if self.support is None:
                chunk = self.chunk_size or max(1, CHUNK_BYTES // (V * kernel.width * flat_p.element_size()))
            else:
                s = 2 * min(self.support, V) + 1
                chunk = self.chunk_size or max(1, CHUNK_BYTES // (s * s * flat_p.element_size() * 4))
            for lo in range(0, n, chunk):
                pc, qc = flat_p[lo : lo + chunk], flat_q[lo : lo + chunk]
                if self.support is None:
                    solver = _Solve(lambda h, e, rows: kernel(h, e), eps_list, self.max_iter, self.tol)
                    value[lo : lo + chunk], grad[lo : lo + chunk], info = _solve_chunk(
                        solver, pc, qc, self.debias, self.op.cap
                    )
                else:
                    value[lo : lo + chunk], grad[lo : lo + chunk], info = self._support_chunk(
                        pc, qc, kernel, eps_list
                    )
                infos.append(info)
            return value.view(lead), grad.view(*lead, V)

        run.dtype = dtype
        out = _SinkhornFunction.apply(logits, run)
        self.last_info = {
            key: max(i[key] for i in infos) for key in infos[0]
        } if infos else {}
        self.last_info.update(chunks=len(infos), eps=self.eps, mode="full" if self.support is None else "support")
        return out

    def _support_chunk(self, p, q, kernel, eps_list):
        emb = None if self.embeddings is None else self.embeddings.to(p.device)
        a, b, cost, ids, dup = _support_problem(
            p, q, self.support, kernel.index[:, 1:], kernel.costs[:, 1:], self.op.cap, emb
        )
        dense = _DenseLogKernel(cost)
        solver = _Solve(dense, eps_list, self.max_iter, self.tol)
        value, f_small, info = _solve_chunk(solver, a, b, self.debias, self.op.cap)
        V = p.shape[1]
        # tokens outside the support sit in the rest bin: their potential is the bin's
        grad = f_small[:, -1:].expand(-1, V + 1).clone()
        grad.scatter_(1, torch.where(dup, V, ids), f_small[:, :-1])
        return value, grad[:, :V], info
