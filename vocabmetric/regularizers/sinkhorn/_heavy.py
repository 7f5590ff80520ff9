"""The heavy-token block-Newton step of the full-vocabulary Sinkhorn pair OT_ε(a, b).

Why: between two peaked next-token distributions most of the mass sits on a few tokens,
and where ``a`` and ``b`` differ there the excess must leave through the cost's flat part,
``e^{−cap/ε}`` (5.6e-8 at ε = cap/16.7). Alternating updates move it a little per
iteration: the marginal error plateaus at 1e-2 for a hundred iterations, 99% of it on the
~10 heaviest tokens. This step solves those tokens' potentials exactly instead.

The row update ``f = T_b(g)`` of an iteration is split: with H the ``h`` heaviest tokens
of a position (by ``a + b``) and ``u_j = b_j e^{g_j/ε}`` (j ∈ H),

.. math::

    e^{−f_i/ε} = S_i(u) = A_i + Σ_{j∈H} u_j K_{ij},\\qquad
    A_i = Σ_{j∉H} b_j e^{(g_j − C_{ij})/ε},\\quad K_{ij} = e^{−C_{ij}/ε},

where ``A`` is one kernel application with H masked out (it replaces the plain update's
kernel call) and ``K_ij = e^{−cap/ε} = δ`` unless i is a stored neighbour of j. Then
``u_H`` maximizes the semi-dual ``F(u) = −Σ_i a_i log S_i(u) + Σ_{j∈H} b_j log u_j`` (concave
in ``x = log u``; at its maximum the plan's columns H sum to ``b_H`` exactly) by damped
Newton steps with a backtracking line search::

    c_j = u_j Σ_i a_i K_ij / S_i,        ∇ = b_H − c,
    M = diag(c) − Σ_i (a_i / S_i²) (u∘K_i)(u∘K_i)ᵀ,   x ← x + α (M + λ diag c)⁻¹ ∇,

and ``f = −ε log S(u)``. The "near" rows (the stored neighbours of H, at most h·(k+1)) are
summed exactly; every other row sees H only through ``δ·Σ u``, so its terms depend on one
scalar and are summed from a per-position histogram of ``log A`` (``BINS`` bins, each at
its a-weighted mean ``A``: relative error ≲ (bin width)², an inexact block solve; the
marginal error is always measured exactly, and where the binning leaves a floor near tol
the solver finishes with plain updates (:mod:`._acceleration`)).

Cost per position and iteration: the masked kernel call (as the plain update), a few O(V)
passes (histogram, ``f``), and per Newton step O(B + E + P + h³): K between the near rows
and H is kept as ``δ + S`` with S's E ≤ h·(k+1) stored entries and the P pairs of entries
that share a row (the Hessian's ``Σ_i w_i S_ij S_ik``), not as a dense (L, h) block: on
the benchmark's kNN operator at N = 64, E = 6,048 (padded to the widest row) and P = 2,893
per position, against L·h = 1,886 × 32 for the dense block.
The scaling-domain solver's block (:mod:`._scaling`) reuses the Newton steps as they are.
Each step is an exact block-coordinate ascent of the dual, so the iteration is monotone.
"""

from __future__ import annotations

import logging
import math

import torch

LOG = logging.getLogger(__name__)

#: Heavy tokens per position, histogram bins for the far rows, Newton steps per block solve,
#: the Levenberg–Marquardt damping and the largest step (in units of ε) per coordinate.
HEAVY_TOKENS = 32
BINS = 512
NEWTON_STEPS = 4
DAMPING = 1e-6
MAX_STEP = 8.0


class HeavyBlock:
    """The heavy tokens of r positions and everything their block solve reuses.

    ``a, b (V, r)`` float, token-major in the kernel's order; ``csr`` the kernel's
    ``(indptr, nbr, costs)`` as torch tensors on the same device.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, csr: tuple, cap: float, eps: float, h: int):
        indptr, nbr, costs = csr
        V, r = a.shape
        h = min(h, V)
        dev = a.device
        self.eps, self.log_delta = eps, -cap / eps
        self.heavy = (a + b).topk(h, 0).indices.t().contiguous()  # (r, h) token ids
        self.b_heavy = b.t().gather(1, self.heavy).double()  # (r, h)
        self.live = self.b_heavy > 0  # a column with no mass stays out of the solve
        self.frozen = torch.zeros(r, dtype=torch.bool, device=dev)  # positions left to plain updates
        # the near rows: each heavy token's stored neighbours (itself first), unique per position
        start, degree = indptr[self.heavy], indptr[self.heavy + 1] - indptr[self.heavy]
        width = int(degree.max())
        slot = torch.arange(width, device=dev)
        real = slot < degree[..., None]  # (r, h, width)
        at = torch.where(real, start[..., None] + slot, 0)
        row = torch.where(real, nbr[at].long(), V)  # V: padding, sorted last
        kern = torch.where(real, torch.exp(-costs[at] / eps), 0.0)
        col = torch.arange(h, device=dev).expand(r, h)[..., None].expand(r, h, width)
        row, col, kern = row.reshape(r, -1), col.reshape(r, -1), kern.reshape(r, -1)
        row, order = row.sort(1)
        col, kern = col.gather(1, order), kern.gather(1, order)
        new = torch.ones_like(row, dtype=torch.bool)
        new[:, 1:] = row[:, 1:] != row[:, :-1]
        rank = new.long().cumsum(1) - 1  # the near-row slot of each entry
        length = int(rank.max()) + 1
        valid_entry = row < V
        self.near = torch.full((r, length), 0, dtype=torch.long, device=dev)
        self.near_valid = torch.zeros((r, length), dtype=torch.bool, device=dev)
        pos = torch.arange(r, device=dev)[:, None].expand_as(row)
        self.near[pos[valid_entry], rank[valid_entry]] = row[valid_entry]
        self.near_valid[pos[valid_entry], rank[valid_entry]] = True
        # K between near rows and heavy columns, δ + S: S as (r, E) entries (near slot, heavy
        # column, e^{−c/ε} − δ; 0 on padding), and the (r, P) pairs of entries sharing a row
        # (slot, j·h + k, S_ij·S_ik) for the Hessian's Σ_i w_i S_ij S_ik
        delta = math.exp(self.log_delta)
        self.ent_row = torch.where(valid_entry, rank, 0)
        self.ent_col = torch.where(valid_entry, col, 0)
        self.ent_val = torch.where(valid_entry, kern - delta, 0.0).to(torch.float64)
        self.pair_row, self.pair_jk, self.pair_val = entry_pairs(self.ent_row, self.ent_col, self.ent_val, valid_entry, h)
        self.h = h
        ids = self.near.t()  # (L, r), padded with token 0 (masked by near_valid)
        self.a_near = torch.where(self.near_valid, a.gather(0, ids).t().double(), 0.0)  # (r, L)
        far = a.to(torch.float64, copy=True)
        far[self.near[self.near_valid], pos[:, :length][self.near_valid]] = 0.0
        self.a_far = far  # (V, r): a with the near rows zeroed

    def select(self, active: torch.Tensor) -> "HeavyBlock":
        """The block of the positions ``active`` only (a shallow copy)."""
        out = object.__new__(type(self))
        out.eps, out.log_delta = self.eps, self.log_delta
        out.h = self.h
        for name in ("heavy", "b_heavy", "live", "frozen", "near", "near_valid", "a_near", "ent_row", "ent_col",
                     "ent_val", "pair_row", "pair_jk", "pair_val"):
            setattr(out, name, getattr(self, name).index_select(0, active))
        out.a_far = self.a_far.index_select(1, active)
        return out

    def mask(self, h_in: torch.Tensor) -> None:
        """Set the heavy tokens' log-weights of ``h_in (V, r)`` to −inf, in place."""
        r = h_in.shape[1]
        h_in[self.heavy, torch.arange(r, device=h_in.device)[:, None]] = float("-inf")

    def solve(self, log_a_rest: torch.Tensor, g: torch.Tensor, tol: float, plain: bool = True):
        """``(f_plain, f)`` from ``log A (V, r)`` (the masked kernel's output) and the current
        ``g (V, r)``: ``f_plain = T_b(g)`` as the plain update gives it (for the marginal
        error of the previous plan; None unless ``plain``) and ``f`` after the heavy block
        solve, both in ``g``'s dtype."""
        eps = self.eps
        r = g.shape[1]
        shift = log_a_rest.amax(0).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # sums relative to e^shift
        log_rest = (log_a_rest - shift).clamp_(min=-600.0).double()  # A = 0 (every token heavy) stays finite
        rest_near = log_rest.gather(0, self.near.t()).t().exp()  # (r, L)
        # the far rows' histogram in log A
        lo = log_rest.amin(0)
        bins = (log_rest - lo).mul_(BINS / (-lo).clamp_min(1e-9)).long().clamp_(0, BINS - 1)
        weight = torch.zeros((BINS, r), dtype=torch.float64, device=g.device).scatter_add_(0, bins, self.a_far)
        mean = torch.zeros_like(weight).scatter_add_(0, bins, log_rest.exp_().mul_(self.a_far))
        far_rest = torch.where(weight > 0, mean / weight.clamp_min(1e-300), 1.0).t()  # (r, B)
        x0 = torch.where(self.live, self.b_heavy.clamp_min(1e-300).log() +
                         g.t().gather(1, self.heavy).double() / eps - shift[:, None].double(), float("-inf"))
        far_weight = weight.t()
        x = self.newton(x0, rest_near, far_rest, far_weight, tol)
        f_plain = self.potential(log_a_rest, rest_near, shift, x0) if plain else None
        return f_plain, self.potential(log_a_rest, rest_near, shift, x)

    def sums(self, x, rest_near, far_rest, far_weight):
        """``(u, s_near, rho_near, s_far, rho_far, c, F, noise)`` at ``x (r, h)``: the column
        sums ``c``, the value ``F`` and its rounding scale ``noise``."""
        delta = math.exp(self.log_delta)
        u = x.exp()  # 0 for the dead columns
        s_near = self.near_sums(rest_near, u)
        s_far = far_rest + delta * u.sum(1, keepdim=True)
        rho_near, rho_far = self.a_near / s_near, far_weight / s_far
        near = self.column_sums(rho_near)
        c = u * (near + delta * rho_far.sum(1, keepdim=True))
        parts = (self.a_near * s_near.log(), far_weight * s_far.log(), self.b_heavy * torch.where(self.live, x, 0.0))
        value = parts[2].sum(1) - parts[0].sum(1) - parts[1].sum(1)
        noise = 64 * torch.finfo(x.dtype).eps * sum(t.abs().sum(1) for t in parts)
        return u, s_near, rho_near, s_far, rho_far, c, value, noise

    def newton(self, x, rest_near, far_rest, far_weight, tol: float) -> torch.Tensor:
        """Damped Newton steps on ``x = log u_H`` with backtracking (F never decreases
        beyond rounding), until the heavy columns' L1 error is below tol/10, or it fell
        100-fold, or ``NEWTON_STEPS``: the outer iteration corrects what is left."""
        delta = math.exp(self.log_delta)
        u, s_near, rho_near, s_far, rho_far, c, value, noise = self.sums(x, rest_near, far_rest, far_weight)
        first = None
        for _ in range(NEWTON_STEPS):
            grad = torch.where(self.live, self.b_heavy - c, 0.0)
            size = grad.abs().sum(1)
            first = size if first is None else first
            todo = (size > 0.1 * tol) & (size > 0.01 * first) & ~self.frozen
            if not bool(todo.any()):
                break
            hess = -self.gram(rho_near / s_near) * (u[:, :, None] * u[:, None, :])
            far2 = (rho_far / s_far).sum(1) * delta**2
            hess -= far2[:, None, None] * u[:, :, None] * u[:, None, :]
            hess.diagonal(dim1=1, dim2=2).add_(c * (1 + DAMPING) + torch.where(self.live, 0.0, 1.0))
            step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1).nan_to_num_(0.0)
            step = torch.where(self.live & todo[:, None], step.clamp(-MAX_STEP, MAX_STEP), 0.0)
            alpha = torch.ones_like(value)
            for _ in range(6):  # backtracking: halve until F does not decrease (beyond rounding)
                trial = x + alpha[:, None] * step
                new = self.sums(trial, rest_near, far_rest, far_weight)
                ok = (new[6] >= value - noise) | ~todo
                if bool(ok.all()):
                    break
                alpha = torch.where(ok, alpha, alpha / 2)
            x = torch.where(ok[:, None], trial, x)
            u, s_near, rho_near, s_far, rho_far, c, value, noise = (
                new if bool(ok.all()) else self.sums(x, rest_near, far_rest, far_weight))
        return x

    def near_sums(self, rest_near: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``S_i = A_i + Σ_j K_ij u_j`` on the near rows (r, L), ``K = δ + S``."""
        delta = math.exp(self.log_delta)
        out = (rest_near + delta * u.sum(1, keepdim=True)).masked_fill_(~self.near_valid, 1.0)
        return out.scatter_add_(1, self.ent_row, self.ent_val * u.gather(1, self.ent_col))

    def column_sums(self, rho: torch.Tensor) -> torch.Tensor:
        """``Σ_i ρ_i K_ij`` over the near rows (r, h), ρ zero off them."""
        delta = math.exp(self.log_delta)
        out = (delta * rho.sum(1, keepdim=True)).expand(-1, self.h).contiguous()
        return out.scatter_add_(1, self.ent_col, self.ent_val * rho.gather(1, self.ent_row))

    def gram(self, w: torch.Tensor) -> torch.Tensor:
        """``Σ_i w_i K_ij K_ik`` over the near rows (r, h, h), w zero off them:
        ``δ²Σw + δ(t_j + t_k) + Σ_i w_i S_ij S_ik`` with ``t = Sᵀw``."""
        delta = math.exp(self.log_delta)
        r, h = w.shape[0], self.h
        t = torch.zeros((r, h), dtype=w.dtype, device=w.device).scatter_add_(1, self.ent_col, self.ent_val * w.gather(1, self.ent_row))
        out = torch.zeros((r, h * h), dtype=w.dtype, device=w.device).scatter_add_(1, self.pair_jk, self.pair_val * w.gather(1, self.pair_row))
        out = out.view(r, h, h)
        out += delta * (t[:, :, None] + t[:, None, :]) + (delta**2 * w.sum(1))[:, None, None]
        return out

    def potential(self, log_rest, rest_near, shift, x) -> torch.Tensor:
        """``f = −ε log S(u)`` over every row, ``(V, r)`` in ``log_rest``'s dtype: far rows
        ``A + δΣu``, the near rows their exact sums (float64)."""
        u = x.exp()
        log_far = (torch.log(u.sum(1)) + self.log_delta).to(log_rest.dtype)  # (r,), relative to e^shift
        log_s = torch.logaddexp(log_rest, log_far + shift)
        s_near = self.near_sums(rest_near, u)
        r = x.shape[0]
        pos = torch.arange(r, device=x.device)[:, None].expand_as(self.near)
        near = (s_near.log() + shift[:, None].double()).to(log_rest.dtype)
        log_s[self.near[self.near_valid], pos[self.near_valid]] = near[self.near_valid]
        return log_s.mul_(-self.eps)


def entry_pairs(row: torch.Tensor, col: torch.Tensor, val: torch.Tensor, valid: torch.Tensor, h: int):
    """The pairs of entries (r, E, sorted by ``row``) that share a row, both orders and each
    entry with itself: ``(row, j·h + k, val_j·val_k)``, (r, P), padding 0 with value 0."""
    rows, jks, vals = [row], [col * h + col], [val * val]
    d = 1
    while d < row.shape[1]:
        same = valid[:, d:] & valid[:, :-d] & (row[:, d:] == row[:, :-d])
        if not bool(same.any()):
            break  # sorted rows: no run of d + 1 equal rows, so none longer
        pv = torch.where(same, val[:, d:] * val[:, :-d], 0.0)
        jk, kj = col[:, :-d] * h + col[:, d:], col[:, d:] * h + col[:, :-d]
        rows += [row[:, d:]] * 2
        jks += [torch.where(same, jk, 0), torch.where(same, kj, 0)]
        vals += [pv, pv]
        d += 1
    row, jk, pv = torch.cat(rows, 1), torch.cat(jks, 1), torch.cat(vals, 1)
    keep = (pv != 0).any(0)  # columns that hold a pair at some position
    return row[:, keep].contiguous(), jk[:, keep].contiguous(), pv[:, keep].contiguous()
