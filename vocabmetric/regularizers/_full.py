"""The full-vocabulary solve of a chunk: the accelerated pair OT_ε(p, q) and warm starts.

Accelerations of the pair's alternating updates (``acceleration=``):

* ``"newton"`` (``"auto"``): every row update ``f = T_q(g)`` solves the heavy tokens'
  potentials exactly (:class:`~._heavy.HeavyBlock`: the masked kernel call replaces the
  plain one, plus O(V) passes). An exact block-coordinate ascent of the dual: the fixed
  point, the value and the envelope gradient are the plain solver's.
* ``"overrelax"``: ``f ← f + ω(T_q(g) − f)``, ``g ← g + ω(T_p(f) − g)`` (ω =
  ``relaxation``); its fixed point is Sinkhorn's, the last update is a plain one.
* ``"none"``: the plain alternating updates.

An acceleration that diverges (the largest marginal error 10× its best so far, or not
finite) or stalls (no new best in ``STALL_CHECKS`` checks) is abandoned with a warning
naming the setting: the pair restarts with plain updates from its best iterate. (A
position that stalls within 100·tol is at the block solve's rounding floor: plain updates
finish it, unsaid.) These decisions are per position, so chunking never changes a result.
"""

from __future__ import annotations

import logging
import math

import torch

from ._heavy import HEAVY_TOKENS, HeavyBlock
from ._scaling import LinearKernel, OutOfRange, ScaledHeavyBlock, scaling_applies
from ._solver import Solver, solve_chunk
from ._sparse_kernel import SparseLogKernel

LOG = logging.getLogger(__name__)

ACCELERATIONS = ("auto", "none", "newton", "overrelax")
#: Checks (every other iteration) without a new best error before an acceleration is
#: abandoned, and the rise above the best that counts as divergence.
STALL_CHECKS, DIVERGENCE = 6, 10.0


class AcceleratedSolver(Solver):
    """:class:`~._solver.Solver` on the full vocabulary (token-major ``(V, n)``) whose pair
    loop is accelerated (see the module docstring); the ε schedule and the symmetric
    problems are the plain solver's."""

    def __init__(self, kernel: SparseLogKernel, eps_list, max_iter, tol, *, acceleration: str = "newton",
                 relaxation: float = 1.5, heavy: int = HEAVY_TOKENS):
        super().__init__(kernel, eps_list, max_iter, tol, pos=1, check_every=2)
        self.acceleration = "newton" if acceleration == "auto" else acceleration
        self.relaxation, self.heavy = relaxation, heavy
        self.kernel = kernel
        self.fell_back: str | None = None

    #: The heavy block's class (the scaling domain's subclasses it, :mod:`._scaling`).
    block_type = HeavyBlock

    def pair(self, a, b, log_a, log_b, g, rows):
        if self.acceleration == "none":
            return super().pair(a, b, log_a, log_b, g, rows)
        return self.accelerated(a, b, log_a, log_b, g, rows)

    def accelerated(self, a, b, wa, wb, g, rows):
        """The accelerated loop from ``g``: ``(f, g, error)``. ``wa, wb`` are the weights
        that :meth:`row_update` and :meth:`column_update` take (log-weights here)."""
        eps, n = self.eps_list[-1], self.positions(g)
        newton = self.acceleration == "newton"
        block = self.block_type(a, b, self.kernel.csr_torch, self.kernel.cap, eps, self.heavy) if newton else None
        omega = 1.0 if newton else self.relaxation
        start = g
        g = g.clone()
        f = self.row_update(block, wb, g, eps, rows, False)[1]
        g = self.column_update(wa, f, eps, rows)
        self.iterations += 1
        err = torch.zeros(n, dtype=f.dtype, device=f.device)
        active = torch.arange(n, device=f.device)
        # per position, so that a position's iterates never depend on its chunk's others
        best = torch.full((n,), math.inf, dtype=f.dtype, device=f.device)
        since = torch.zeros(n, dtype=torch.int64, device=f.device)
        slow = torch.zeros(n, dtype=torch.int64, device=f.device)  # checks without a 10% gain
        mark = torch.full((n,), math.inf, dtype=f.dtype, device=f.device)
        best_g = start.clone()
        stale = True  # the active set or the frozen flags changed: select the fixed inputs again
        for it in range(self.max_iter - 1):
            take = self.taker(active, n)
            if stale:  # the block and the weights of the active positions, reused until they change
                sub = block if block is None or active.numel() == n else block.select(active)
                if sub is not None and bool(sub.frozen.all()):  # every position at the floor: plain updates
                    sub = block = None
                fixed = {id(x): take(x) for x in (a, b, wa, wb)}
                stale = False
            check = self.checks(it, self.max_iter - 1)
            plain, fn = self.row_update(sub, fixed[id(wb)], take(g), eps, rows[active], check)
            if check:
                err[active] = e = self.pair_error(fixed[id(a)], take(f), plain, eps)
            self.iterations += 1
            if omega != 1.0:
                fn = fn.sub_(take(f)).mul_(omega).add_(take(f))
            gn = self.column_update(fixed[id(wa)], fn, eps, rows[active])
            if omega != 1.0:
                gn = gn.sub_(take(g)).mul_(omega).add_(take(g))
            f = self.put(f, active, fn)
            g = self.put(g, active, gn)
            if check:
                ea, ba = err[active], best[active]
                better = ea < ba
                best[active] = torch.where(better, ea, ba)
                since[active] = torch.where(better, 0, since[active] + 1)
                if bool(better.any()):
                    pick = active[better]
                    best_g.index_copy_(1, pick, g.index_select(1, pick))
                gain = ea < 0.9 * mark[active]
                mark[active] = torch.where(gain, ea, mark[active])
                slow[active] = torch.where(gain, 0, slow[active] + 1)
                stalled = since[active] >= STALL_CHECKS
                # within 100·tol a stall is the block solve's rounding floor: plain updates
                # finish that position, unsaid
                floor = (stalled | (slow[active] >= STALL_CHECKS)) & (best[active] <= 100 * self.tol)
                if block is not None and bool(floor.any()):
                    block.frozen[active[floor]] = True
                    stale = True
                loud = stalled & ~floor
                if not bool(torch.isfinite(ea).all()) or bool((ea > DIVERGENCE * ba).any()) or bool(loud.any()):
                    worst = float(ea.max())
                    return self.abandon(worst, float(best.max()), a, b, wa, wb, best_g, rows)
                stale |= bool((e <= self.tol).any())
                active = active[e > self.tol]
                if active.numel() == 0:
                    break
        if omega != 1.0:  # end on a plain update: g = T_a(f) exactly
            f = self.transform(wb, g, eps, rows)
            g = self.transform(wa, f, eps, rows)
            self.iterations += 1
        return f, g, float(err.max()) if err.numel() else 0.0

    def column_update(self, log_w, pot, eps, rows):
        """The loop's column update ``g = T_a(f)`` (:meth:`transform`)."""
        return self.transform(log_w, pot, eps, rows)

    def pair_error(self, mass, old, new, eps):
        """The loop's marginal error (:meth:`error`)."""
        return self.error(mass, old, new, eps)

    def abandon(self, worst, best, a, b, log_a, log_b, g, rows):
        """Plain updates from each position's best iterate ``g``, with the budget that is
        left; recorded in ``fell_back`` (and so warned about)."""
        what = "diverged" if not math.isfinite(worst) or worst > DIVERGENCE * best else "stopped decreasing the error"
        said = f"acceleration={self.acceleration!r}" + (
            f" (relaxation={self.relaxation})" if self.acceleration == "overrelax" else "")
        said += f" {what} (marginal error {worst:.3g}, best {best:.3g})"
        LOG.debug("SinkhornDivergence: %s; plain iterations from the best iterate", said)
        self.fell_back = said
        left = self.max_iter
        self.max_iter = max(self.max_iter - self.iterations, 2)
        try:
            return Solver.pair(self, a, b, log_a, log_b, g, rows)
        finally:
            self.max_iter = left

    def row_update(self, block: HeavyBlock | None, log_b, g, eps, rows, plain: bool = True):
        """``(T_b(g), f)``: the plain row update (for the marginal error) and the
        accelerated one (the heavy block solved; the plain one without a block). The
        plain one only if ``plain`` (on the iterations that check the error)."""
        if block is None:
            f = self.transform(log_b, g, eps, rows)
            return f, f
        h = torch.add(log_b, g, alpha=1 / eps, out=self.pool.take(g))
        block.mask(h)
        log_rest = self.lk(h, eps, rows, out=h)
        f_plain, f = block.solve(log_rest, g, self.tol, plain)
        self.pool.give(h)
        return f_plain, f


class ScalingSolver(AcceleratedSolver):
    """:class:`AcceleratedSolver` (``acceleration="newton"``) whose symmetric problems and
    pair run in the scaling domain (:mod:`._scaling`: no exp or log per iteration, same
    fixed point); the ε schedule, the fall-back of a stalled acceleration and any problem
    whose sums leave the safe range (:class:`~._scaling.OutOfRange`), in the log domain.
    Potentials enter and leave as potentials, so warm starts are the log solver's."""

    @property
    def block_type(self):
        return ScaledHeavyBlock if self.scaled else HeavyBlock

    def __init__(self, kernel: SparseLogKernel, eps_list, max_iter, tol, **kw):
        super().__init__(kernel, eps_list, max_iter, tol, **kw)
        self.linear = LinearKernel(kernel, eps_list[-1])
        self.scaled = False  # whether the pair loop's hooks are the scaling ones now
        self._logs, self._abandoned = None, False

    def symmetric(self, a, log_a, f, rows):
        """The parent's loop as ``φ ← √(φ · T_a(φ))``; out of range, the log domain's."""
        eps, n = self.eps_list[-1], self.positions(f)
        try:
            phi = f.div(eps).exp_()
            err = torch.zeros(n, dtype=f.dtype, device=f.device)
            active = torch.arange(n, device=f.device)
            for it in range(self.max_iter):
                take = self.taker(active, n)
                pa, ma = take(phi), take(a)
                t = self.linear.update(ma, pa, self.pool)
                self.iterations += 1
                check = self.checks(it, self.max_iter)
                e = self.linear.average(ma, pa, t, check)  # t ← √(pa · t)
                phi = self.put(phi, active, t)
                if check:
                    err[active] = e
                    active = active[e > self.tol]
                    if active.numel() == 0:
                        break
        except OutOfRange as why:
            LOG.debug("SinkhornDivergence: %s; the symmetric problems in the log domain", why)
            return super().symmetric(a, log_a, f, rows)
        self.pool.give(f)
        return phi.log_().mul_(eps), float(err.max()) if err.numel() else 0.0

    def pair(self, a, b, log_a, log_b, g, rows):
        """The accelerated loop on scalings (masses as its weights; ``log_a, log_b`` kept
        for a fall-back); out of range, the log domain's from ``g``."""
        if self.acceleration != "newton":
            return super().pair(a, b, log_a, log_b, g, rows)
        eps = self.eps_list[-1]
        self._logs, self.scaled, self._abandoned = (log_a, log_b), True, False
        try:
            f, g_out, err = self.accelerated(a, b, a, b, g.div(eps).exp_(), rows)
        except OutOfRange as why:
            LOG.debug("SinkhornDivergence: %s; the pair in the log domain", why)
            self.scaled = False
            return super().pair(a, b, log_a, log_b, g, rows)
        finally:
            self.scaled = False
        if self._abandoned:  # the log domain's plain iterations returned potentials
            return f, g_out, err
        return f.log_().mul_(eps), g_out.log_().mul_(eps), err

    def abandon(self, worst, best, a, b, log_a, log_b, g, rows):
        """The parent's fall-back, in the log domain from the best iterate's potentials."""
        if not self.scaled:
            return super().abandon(worst, best, a, b, log_a, log_b, g, rows)
        self.scaled, self._abandoned = False, True
        return super().abandon(worst, best, a, b, *self._logs, g.log().mul_(self.eps_list[-1]), rows)

    def column_update(self, mass, pot, eps, rows):
        return self.linear.update(mass, pot, self.pool) if self.scaled else super().column_update(mass, pot, eps, rows)

    def pair_error(self, mass, old, new, eps):
        return self.linear.ratio_error(mass, old, new) if self.scaled else super().pair_error(mass, old, new, eps)

    def row_update(self, block, mass, psi, eps, rows, plain: bool = True):
        """``(T_b(ψ), φ)`` on scalings: the masked kernel ``A = K(b ⊙ ψ)`` (heavy tokens
        zeroed), then the block solve (:meth:`~._scaling.ScaledHeavyBlock.solve_scaled`)."""
        if not self.scaled:
            return super().row_update(block, mass, psi, eps, rows, plain)
        if block is None:
            phi = self.linear.update(mass, psi, self.pool)
            return phi, phi
        w = self.pool.take(psi)
        total = self.linear.weigh(mass, psi, w)
        block.mask(w, total)
        total.clamp_(min=0.0)  # the heavy tokens' share came off a float64 sum: no rounding below 0
        rest = self.linear.apply(w, total, self.pool.take(psi), invert=False)
        self.pool.give(w)
        phi_plain, phi = block.solve_scaled(rest, psi, total, self.tol, plain, self.pool)
        self.pool.give(rest)
        return phi_plain, phi


def solve_full_chunk(kernel: SparseLogKernel, p: torch.Tensor, q: torch.Tensor, *, eps_list: list[float],
                     max_iter: int, tol: float, debias: bool, dz_out: torch.Tensor | None = None,
                     acceleration: str = "auto", relaxation: float = 1.5, warm: dict | None = None):
    """Value ``(rows,)`` and info of a chunk ``p, q (rows, V)`` on the full vocabulary;
    ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` into ``dz_out (rows, V)`` if given.

    p and q are copied once into the kernel's token-major (V, rows) layout and token order,
    and the gradient once back: O(rows·V) beside the solve's O(rows·V·k) per iteration.
    ``warm`` (a dict, updated in place): the potentials to start from and to keep, see
    :func:`~._solver.solve_chunk`."""
    order, rank = kernel.permutation
    p, q = (x.index_select(1, order).t().contiguous() for x in (p, q))
    scaled = acceleration in ("auto", "newton") and scaling_applies(kernel, eps_list[-1])
    solver = (ScalingSolver if scaled else AcceleratedSolver)(
        kernel, eps_list, max_iter, tol, acceleration=acceleration, relaxation=relaxation)
    value, h, info = solve_chunk(solver, p, q, debias, warm)
    info["fell_back"] = solver.fell_back
    if dz_out is not None:  # a zero-mass token gets no gradient, even if h is huge
        h = h.masked_fill_(p <= 0, 0.0)  # h is the chunk's own: in place
        h.sub_(torch.einsum("ji,ji->i", p, h)).mul_(p)
        torch.index_select(h.t().contiguous(), 1, rank, out=dz_out)
    return value, info
