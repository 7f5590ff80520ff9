"""The support problem of support-mode Sinkhorn: per position, top-m(p) ∪ top-m(q) plus one
"rest" bin holding the remaining mass at cost ``cap`` from every other point; its
(2m+1)² cost sub-matrix (gathered from the operator, or computed from embeddings); the
dense log-kernel on it; and the chunk's solve, value and gradient on the vocabulary.

A kernel application is one batched matrix-vector product with ``K = exp(−C/ε)`` (the
linear domain, shifted per row; positions whose sums leave the dtype's range are redone
in the log domain): O(m²) per position and iteration. The pair OT(p, q) is solved by
Newton's method (:mod:`._newton`, O(m³) per step) for m ≤ 128.
"""

from __future__ import annotations

import logging
import math

import torch

from ._logspace import LINEAR_RANGE, lse_
from ._acceleration import PLAIN, DenseNewton
from ._solver import Solver, solve_chunk

LOG = logging.getLogger(__name__)

#: Support mode solves the pair by Newton steps (O(s³) each, tens of them) up to this many
#: support points s = 2m + 1, and by alternating updates (O(s²) each, hundreds to
#: thousands at small ε) above it, where a Newton step costs more than they do.
NEWTON_MAX_POINTS = 257


def support_problem(p, q, m, op_index, op_costs, cap, embeddings, slots=None):
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


class DenseLogKernel:
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
        floor = LINEAR_RANGE.get(self.cost.dtype, LINEAR_RANGE[torch.float32])[0]
        return self._scaled_kernel(eps, floor)[0].index_select(0, rows)

    def __call__(self, h: torch.Tensor, eps: float, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        floor, accept = LINEAR_RANGE.get(h.dtype, LINEAR_RANGE[torch.float32])
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
            result[pick] = lse_(block)
        return result if scale == 1.0 else result.mul_(scale)


def solve_support_chunk(p, q, *, support, table, cap, embeddings, scratch, eps_list, max_iter, tol, debias,
                        dz_out=None, newton=True):
    """Value ``(rows,)`` and info of a chunk ``p, q (rows, V)`` in support mode; ``∂S/∂z``
    into ``dz_out (rows, V)`` if given.

    ``table``: the operator's ``(index, costs)`` on p's device; ``embeddings`` (V, d) or
    None; ``scratch``: a dict kept for one forward (the slot map lives there). Every token
    outside the support sits in the rest bin, so the potential ``h`` on the vocabulary is
    the bin's there and ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` is one scaling of ``p`` plus the
    support's 2m entries: no (rows, V) potential is built."""
    rows, V = p.shape
    slots = None
    if embeddings is None:  # the slot map, −1 off the support: made once per forward
        if scratch.get("slots") is None or scratch["slots"].shape[0] < rows:
            scratch["slots"] = torch.full((rows, V), -1, dtype=torch.int32, device=p.device)
        slots = scratch["slots"][:rows]
    index, costs = table
    a, b, cost, ids, dup = support_problem(p, q, support, index, costs, cap, embeddings, slots)
    strategy = DenseNewton() if newton and cost.shape[-1] <= NEWTON_MAX_POINTS else PLAIN
    solver = Solver(DenseLogKernel(cost), eps_list, max_iter, tol, acceleration=strategy)
    value, f_small, info = solve_chunk(solver, a, b, debias)
    if dz_out is not None:
        write_support_gradient(p, ids, dup, f_small, dz_out)
    return value, info


def write_support_gradient(p, ids, dup, h_small, dz_out) -> None:
    """``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` into ``dz_out (rows, V)`` from the gradient potential
    ``h_small (rows, s₁ + 1)`` on the support ``ids (rows, s₁)`` and its rest bin (last):
    every token off the support takes the bin's potential, so this is one scaling of ``p``
    plus the support's s₁ entries."""
    # a duplicate (zero-mass) point follows its original in the sorted support and
    # takes the original's potential; a token without mass gets no gradient
    rest, f_ids = h_small[:, -1:], h_small[:, :-1]
    f_ids = torch.where(dup, f_ids.roll(1, -1), f_ids)
    p_ids = p.gather(1, ids)
    p_once = torch.where(dup, 0.0, p_ids)
    mean = rest * (1 - p_once.sum(-1, keepdim=True)) + (p_once * f_ids).sum(-1, keepdim=True)
    torch.mul(p, rest - mean, out=dz_out)
    dz_out.scatter_(1, ids, torch.where(p_ids > 0, p_ids * (f_ids - mean), 0.0))
