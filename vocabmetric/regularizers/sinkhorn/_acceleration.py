"""How the pair OT_ε(a, b) is iterated: acceleration strategies, objects a solver is given.

As ott-jax keeps momentum and Anderson acceleration apart from its Sinkhorn loop
(``acceleration.py``), each strategy here owns one pair loop and reaches the problem only
through its solver's domain operations (:class:`~._solver.Solver`: ``row_update``,
``column_update``, ``pair_error``, ``block_type`` and the layout helpers), so one strategy
runs in the log domain and the scaling domain alike. ``pair(solver, a, b, wa, wb, g, rows,
iterations)`` takes the masses ``a, b`` (for the marginal error), the domain's weights
``wa, wb`` (log-masses in the log domain, masses in the scaling domain), the start ``g``
in the domain's units, and returns a :class:`~._state.State`.

* :data:`PLAIN` (``acceleration="none"``): alternating updates ``f = T_b(g)``,
  ``g = T_a(f)``; O(V·k) per update and position on the full vocabulary, O(s²) on a support.
* :class:`HeavyBlockNewton` (``"newton"``, ``"auto"``, full vocabulary): every row update
  solves the ~32 heaviest tokens' potentials exactly (:class:`~._heavy.HeavyBlock`: the
  masked kernel call replaces the plain one, plus O(V) passes): an exact block-coordinate
  ascent of the dual, so the fixed point, value and envelope gradient are the plain loop's.
* :class:`OverRelaxation` (``"overrelax"``): ``f ← f + ω(T_b(g) − f)``,
  ``g ← g + ω(T_a(f) − g)``; its fixed point is Sinkhorn's, and the last update is plain.
* :class:`DenseNewton` (support mode, s ≤ 257 points): Newton's method on the semi-dual
  (:func:`~._newton.newton_pair`, O(s³) per step, tens of steps).

The two full-vocabulary accelerations are watched per position (so chunking never changes
a result): one that diverges (the marginal error 10× its best so far, or not finite) or
stalls (no new best in ``STALL_CHECKS`` checks) returns a state that says so
(``fell_back``, with each position's best iterate in ``g``), and the solver hands the pair
to plain updates from there (:meth:`~._solver.Solver.fall_back`). A position that stalls
within 100·tol is at the block solve's rounding floor: plain updates finish it, unsaid.
"""

from __future__ import annotations

import math

import torch

from ._heavy import HEAVY_TOKENS
from ._newton import newton_pair
from ._scaling import OutOfRange
from ._state import State

#: Checks (every other iteration) without a new best error before an acceleration is
#: abandoned, and the rise above the best that counts as divergence.
STALL_CHECKS, DIVERGENCE = 6, 10.0


class Plain:
    """Alternating updates from ``g``; ends on ``g = T_a(f)`` exactly, so the plan's column
    marginal is b and ``⟨a, f⟩ + ⟨b, g⟩`` is the dual objective at that pair."""

    name = "none"

    def pair(self, solver, a, b, wa, wb, g, rows, iterations: int) -> State:
        eps, n = solver.eps_list[-1], solver.positions(g)
        state = State(f=None, g=g, iterations=iterations)
        try:
            g = g.clone()
            f = solver.row_update(None, wb, g, eps, rows)[1]
            g = solver.column_update(wa, f, eps, rows)
            state = State(f, g, torch.zeros(n, dtype=f.dtype, device=f.device), iterations + 1)
            active = torch.arange(n, device=f.device)
            for it in range(solver.max_iter - 1):
                take = solver.taker(active, n)
                fn = solver.row_update(None, take(wb), take(state.g), eps, rows[active])[1]
                check = solver.checks(it, solver.max_iter - 1)
                if check:
                    e = solver.pair_error(take(a), take(state.f), fn, eps)
                    state = state.measured(active, e)
                state = state.set(iterations=state.iterations + 1)
                gn = solver.column_update(take(wa), fn, eps, rows[active])
                # f first: put may hand fn to the pool, and gn was made from it already
                state = state.set(f=solver.put(state.f, active, fn), g=solver.put(state.g, active, gn))
                if check:
                    active = active[e > solver.tol]
                    if active.numel() == 0:
                        break
        except OutOfRange as why:
            return state.set(out_of_range=str(why))
        return state


#: The plain strategy (stateless: one instance serves every solver).
PLAIN = Plain()


class Watch:
    """The divergence and stall watch of one monitored pair loop, per position: the best
    error so far and its iterate ``g``, the checks since that best, and the checks without
    a 10% gain (the block solve's floor). (n,) vectors and one copy of ``g``."""

    def __init__(self, n: int, like: torch.Tensor, start: torch.Tensor):
        kw = dict(dtype=like.dtype, device=like.device)
        self.best = torch.full((n,), math.inf, **kw)
        self.since = torch.zeros(n, dtype=torch.int64, device=like.device)
        self.slow = torch.zeros(n, dtype=torch.int64, device=like.device)
        self.mark = torch.full((n,), math.inf, **kw)
        self.best_g = start.clone()

    def update(self, active, ea, g, block, tol: float) -> tuple[bool, float | None]:
        """Record the errors ``ea`` of the positions ``active`` (``g`` the iterate that
        made them). Returns ``(frozen, worst)``: whether positions were left to plain
        updates inside the block (at its floor), and the largest error if the loop must
        be abandoned (None otherwise)."""
        ba = self.best[active]
        better = ea < ba
        self.best[active] = torch.where(better, ea, ba)
        self.since[active] = torch.where(better, 0, self.since[active] + 1)
        if bool(better.any()):
            pick = active[better]
            self.best_g.index_copy_(1, pick, g.index_select(1, pick))
        gain = ea < 0.9 * self.mark[active]
        self.mark[active] = torch.where(gain, ea, self.mark[active])
        self.slow[active] = torch.where(gain, 0, self.slow[active] + 1)
        stalled = self.since[active] >= STALL_CHECKS
        floor = (stalled | (self.slow[active] >= STALL_CHECKS)) & (self.best[active] <= 100 * tol)
        frozen = block is not None and bool(floor.any())
        if frozen:
            block.frozen[active[floor]] = True
        loud = stalled & ~floor
        if not bool(torch.isfinite(ea).all()) or bool((ea > DIVERGENCE * ba).any()) or bool(loud.any()):
            return frozen, float(ea.max())
        return frozen, None


class Monitored:
    """A pair loop with an optional heavy block and relaxation ω, watched (:class:`Watch`);
    the full vocabulary's layout (token-major (V, n)). Subclasses set :meth:`block`, ω."""

    name = "?"
    omega = 1.0

    def block(self, solver, a, b, eps: float):
        """The heavy block of the positions (None: plain row updates)."""
        return None

    def describe(self) -> str:
        return f"acceleration={self.name!r}"

    def abandoned(self, worst: float, best: float) -> str:
        what = "diverged" if not math.isfinite(worst) or worst > DIVERGENCE * best else "stopped decreasing the error"
        return f"{self.describe()} {what} (marginal error {worst:.3g}, best {best:.3g})"

    def pair(self, solver, a, b, wa, wb, g, rows, iterations: int) -> State:
        eps, n, omega = solver.eps_list[-1], solver.positions(g), self.omega
        state = State(f=None, g=g, iterations=iterations)
        try:
            block = self.block(solver, a, b, eps)
            watch = Watch(n, g, g)
            g = g.clone()
            f = solver.row_update(block, wb, g, eps, rows, False)[1]
            g = solver.column_update(wa, f, eps, rows)
            state = State(f, g, torch.zeros(n, dtype=f.dtype, device=f.device), iterations + 1)
            active = torch.arange(n, device=f.device)
            stale = True  # the active set or the frozen flags changed: select the fixed inputs again
            for it in range(solver.max_iter - 1):
                take = solver.taker(active, n)
                if stale:  # the block and the weights of the active positions, reused until they change
                    sub = block if block is None or active.numel() == n else block.select(active)
                    if sub is not None and bool(sub.frozen.all()):  # every position at the floor: plain updates
                        sub = block = None
                    fixed = {id(x): take(x) for x in (a, b, wa, wb)}
                    stale = False
                check = solver.checks(it, solver.max_iter - 1)
                plain, fn = solver.row_update(sub, fixed[id(wb)], take(state.g), eps, rows[active], check)
                if check:
                    e = solver.pair_error(fixed[id(a)], take(state.f), plain, eps)
                    state = state.measured(active, e)
                state = state.set(iterations=state.iterations + 1)
                if omega != 1.0:
                    fn = fn.sub_(take(state.f)).mul_(omega).add_(take(state.f))
                gn = solver.column_update(fixed[id(wa)], fn, eps, rows[active])
                if omega != 1.0:
                    gn = gn.sub_(take(state.g)).mul_(omega).add_(take(state.g))
                state = state.set(f=solver.put(state.f, active, fn), g=solver.put(state.g, active, gn))
                if check:
                    frozen, worst = watch.update(active, state.error[active], state.g, block, solver.tol)
                    stale |= frozen
                    if worst is not None:
                        return state.set(g=watch.best_g, fell_back=self.abandoned(worst, float(watch.best.max())))
                    stale |= bool((e <= solver.tol).any())
                    active = active[e > solver.tol]
                    if active.numel() == 0:
                        break
            if omega != 1.0:  # end on a plain update: g = T_a(f) exactly
                f = solver.row_update(None, wb, state.g, eps, rows)[1]
                g = solver.column_update(wa, f, eps, rows)
                state = state.set(f=f, g=g, iterations=state.iterations + 1)
        except OutOfRange as why:
            return state.set(out_of_range=str(why))
        return state


class HeavyBlockNewton(Monitored):
    """Every row update solves the ``heavy`` heaviest tokens' potentials exactly (block
    Newton, :mod:`._heavy`; the solver's ``block_type`` gives the domain's block)."""

    name = "newton"

    def __init__(self, heavy: int = HEAVY_TOKENS):
        self.heavy = heavy

    def block(self, solver, a, b, eps: float):
        geometry = solver.geometry
        return solver.block_type(a, b, geometry.csr_torch, geometry.cap, eps, self.heavy)


class OverRelaxation(Monitored):
    """Over-relaxed updates with ω = ``omega`` in (0, 2); the last update is a plain one."""

    name = "overrelax"

    def __init__(self, omega: float):
        self.omega = omega

    def describe(self) -> str:
        return f"{super().describe()} (relaxation={self.omega})"


class DenseNewton:
    """The support mode's pair by Newton's method (:func:`~._newton.newton_pair`), on a
    dense geometry (``neg_cost``); ``wa, wb`` are log-masses (the log domain)."""

    name = "newton"

    def pair(self, solver, a, b, log_a, log_b, g, rows, iterations: int) -> State:
        eps = solver.eps_list[-1]
        f, g, err, steps = newton_pair(
            lambda log_w, pot, active: solver.transform(log_w, pot, eps, rows[active]),
            lambda active: solver.geometry.neg_cost(eps, rows[active]),
            a, b, log_a, log_b, g, eps, solver.tol, solver.max_iter,
        )
        return State(f, g, err, iterations + steps)


#: The public ``acceleration=`` settings, and the full-vocabulary strategy each names.
ACCELERATIONS = ("auto", "none", "newton", "overrelax")


def full_acceleration(name: str, relaxation: float):
    """The strategy object for ``acceleration=name`` on the full vocabulary."""
    if name in ("auto", "newton"):
        return HeavyBlockNewton()
    return OverRelaxation(relaxation) if name == "overrelax" else PLAIN
