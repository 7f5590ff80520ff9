"""The full-vocabulary solver in the scaling domain: no ``exp`` or ``log`` per iteration.

With scalings ``φ = e^{f/ε}``, ``ψ = e^{g/ε}`` the log domain's updates read
``φ = T_b(ψ) = 1/K(b ⊙ ψ)``, the symmetric update ``½(f + T_a(f))`` is ``√(φ · T_a(φ))``
and the marginal error is ``Σ_j m_j |φ_old/φ_new − 1|`` (:mod:`._scaling` has the
arithmetic: two passes over (V, n) per kernel application where the log domain makes
nine). Same equations, same fixed point, same iteration: only the arithmetic differs.

The domain is fixed when the solver is built (as ott-jax fixes ``lse_mode``):
:func:`~._full.solve_full_chunk` builds a :class:`ScalingSolver` where
:func:`~._scaling.scaling_applies` (the numba path, ``cap/ε`` within ``SCALING_RANGE``)
and the acceleration is the heavy block. A problem whose sums leave ``SUM_RANGE`` comes
back as a state that says so (``out_of_range``) and is redone from its start by a new
log-domain solver (:meth:`ScalingSolver.in_log_domain`), its iterations counted on; an
abandoned acceleration is handed, from its best iterate's potentials, to plain log-domain
updates (:meth:`~._solver.Solver.fall_back`). Potentials enter and leave as potentials
(one ``exp`` and one ``log`` pass per problem), so warm starts and the value are the log
solver's.

Cost per iteration and position: O(V·k) multiply-adds and two O(V) passes, plus the heavy
block's numba passes (far-row histogram, potentials).
"""

from __future__ import annotations

import logging

import torch

from ._scaling import LinearKernel, OutOfRange, ScaledHeavyBlock
from ._solver import Solver
from ._state import State

LOG = logging.getLogger(__name__)


class ScalingSolver(Solver):
    """A full-vocabulary :class:`~._solver.Solver` (token-major ``(V, n)``) whose symmetric
    problems and pair run on scalings; the ε schedule is the log domain's. ``geometry``: a
    :class:`~._kernel.SparseLogKernel` on the numba path."""

    #: The heavy block of the scaling domain.
    block_type = ScaledHeavyBlock

    def __init__(self, geometry, eps_list, max_iter, tol, *, acceleration, pool=None):
        super().__init__(geometry, eps_list, max_iter, tol, pos=1, check_every=2, acceleration=acceleration,
                         pool=pool)
        self.linear = LinearKernel(geometry, eps_list[-1])

    def in_log_domain(self) -> Solver:
        """The log-domain solver a problem is handed to when its sums leave the range."""
        return self.log_solver()

    def symmetric(self, a, log_a, f, rows, iterations: int = 0) -> State:
        """The log domain's loop as ``φ ← √(φ · T_a(φ))``; out of range, the log domain's."""
        eps, n = self.eps_list[-1], self.positions(f)
        state = State(f=f.div(eps).exp_(), error=torch.zeros(n, dtype=f.dtype, device=f.device), iterations=iterations)
        try:
            active = torch.arange(n, device=f.device)
            for it in range(self.max_iter):
                take = self.taker(active, n)
                pa, ma = take(state.f), take(a)
                t = self.linear.update(ma, pa, self.pool)
                state = state.set(iterations=state.iterations + 1)
                check = self.checks(it, self.max_iter)
                e = self.linear.average(ma, pa, t, check)  # t ← √(pa · t)
                state = state.set(f=self.put(state.f, active, t))
                if check:
                    state = state.measured(active, e)
                    active = active[e > self.tol]
                    if active.numel() == 0:
                        break
        except OutOfRange as why:
            LOG.debug("SinkhornDivergence: %s; the symmetric problems in the log domain", why)
            return self.in_log_domain().symmetric(a, log_a, f, rows, state.iterations)
        self.pool.give(f)
        return state.set(f=state.f.log_().mul_(eps))

    def pair(self, a, b, log_a, log_b, g, rows, iterations: int = 0) -> State:
        """The strategy's loop on scalings (the masses as its weights); out of range, the
        log domain's from ``g``; abandoned, plain log-domain updates from its best iterate."""
        eps = self.eps_list[-1]
        state = self.acceleration.pair(self, a, b, a, b, g.div(eps).exp_(), rows, iterations)
        if state.out_of_range:
            LOG.debug("SinkhornDivergence: %s; the pair in the log domain", state.out_of_range)
            return self.in_log_domain().pair(a, b, log_a, log_b, g, rows, state.iterations)
        if state.fell_back:
            return self.fall_back(state, a, b, log_a, log_b, rows)
        return state.set(f=state.f.log_().mul_(eps), g=state.g.log_().mul_(eps))

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """``ε log x``: a potential from a scaling (a new tensor)."""
        return x.log().mul_(self.eps_list[-1])

    def column_update(self, mass, pot, eps, rows):
        """``ψ = 1/K(a ⊙ φ)``."""
        return self.linear.update(mass, pot, self.pool)

    def pair_error(self, mass, old, new, eps):
        """``Σ_j m_j |old_j/new_j − 1|``."""
        return self.linear.ratio_error(mass, old, new)

    def row_update(self, block, mass, psi, eps, rows, plain: bool = True):
        """``(T_b(ψ), φ)`` on scalings: the masked kernel ``A = K(b ⊙ ψ)`` (heavy tokens
        zeroed), then the block solve (:meth:`~._scaling.ScaledHeavyBlock.solve_scaled`)."""
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
