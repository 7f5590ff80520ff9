"""The Sinkhorn solver for a chunk of positions, on any geometry: the ε schedule, the
symmetric problems OT(p, p) and OT(q, q), the pair OT(p, q) and the debiased value with its
envelope gradient (:func:`solve_chunk`).

The potentials solve, in the log domain (stable in float32 down to ε = 0.01·cap),
``f_i = −ε·log Σ_j q_j exp((g_j − C_ij)/ε)`` and ``g_j = −ε·log Σ_i p_i exp((f_i − C_ij)/ε)``.
ε is annealed geometrically from ``cap`` down to its target with one averaged update per
step (ε-scaling, Feydy 2019 Alg. 3.5) of the self-transport potentials; at the target ε
the two symmetric problems (update ``f ← ½(f + T_p(f))``, stacked in one kernel call) run
to a marginal error ``tol``, then the pair starts from OT(q, q)'s potential — the exact
solution when p = q. A position leaves the active set as soon as it has converged.

As ott-jax's ``sinkhorn.py``: the solver's settings — geometry (:mod:`._geometry`), domain,
ε schedule, budget, acceleration strategy (:mod:`._acceleration`) — are fixed when it is
built; each loop runs over a frozen :class:`~._state.State` and returns one, and a loop
that cannot go on (an abandoned acceleration; in the scaling domain,
:mod:`._scaling_solver`, a sum out of range) is handed to a new solver from that state.

Cost per iteration and position: one geometry application per problem (O(V·k) on the full
vocabulary, O(s²) on a support) and, on the iterations that check, one O(V) error pass.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ._acceleration import PLAIN
from ._geometry import Geometry
from ._heavy import HeavyBlock
from ._kernel import FUSED_CHUNK_ALIGN, FUSED_CHUNK_BYTES, SparseLogKernel
from ._logspace import log_probs, marginal_error
from ._state import State

LOG = logging.getLogger(__name__)


def eps_schedule(eps: float, cap: float, scaling: float) -> list[float]:
    """Geometric ε annealing from ``cap`` down to ``eps`` (the last entry is ``eps``)."""
    if not 0 < scaling < 1 or eps >= cap:
        return [eps]
    n = int(math.ceil(math.log(cap / eps) / -math.log(scaling)))
    return [cap * scaling**s for s in range(n) if cap * scaling**s > eps] + [eps]


class Pool:
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


class Solver:
    """Sinkhorn loops on a chunk of r positions in the log domain, on one geometry.

    The configuration is fixed at construction and never changed by a solve: the geometry
    (:mod:`._geometry`: ``geometry(h, eps, rows, out=, scale=)`` is the log-kernel
    ``scale · log Σ_j exp(h_j − C_ij/ε)``), the ε schedule, ``max_iter``, ``tol``, the
    layout and the pair's acceleration strategy (:mod:`._acceleration`). Each loop takes
    and returns a :class:`~._state.State`; a loop that cannot go on returns a state that
    says why, and the problem is handed to a new solver (:meth:`fall_back`). The pool
    (:class:`Pool`) is scratch memory, shared with the solvers a problem is handed to.

    Every tensor is (positions, tokens) with positions on axis ``pos``: 0 for the support
    mode's (n, s) problems, 1 for the full vocabulary's token-major (V, n) potentials.
    ``rows (n,)`` names the position (0..r-1) each input position belongs to (only a
    per-position cost, the support mode's, needs it).
    """

    #: The heavy block of the log domain (:class:`~._heavy.HeavyBlock`).
    block_type = HeavyBlock

    def __init__(self, geometry: Geometry, eps_list: list[float], max_iter: int, tol: float, pos: int = 0,
                 check_every: int = 1, *, acceleration=PLAIN, pool: Pool | None = None):
        self.geometry, self.eps_list, self.max_iter, self.tol = geometry, eps_list, max_iter, tol
        self.pos, self.tokens, self.check_every = pos, 1 - pos, check_every
        self.acceleration = acceleration
        self.pool = Pool() if pool is None else pool

    def log_solver(self, **changes) -> "Solver":
        """A log-domain :class:`Solver` with this one's settings but ``changes``
        (``acceleration``, ``max_iter``), sharing the pool: the solver a problem is handed to."""
        kw = dict(acceleration=self.acceleration, max_iter=self.max_iter)
        kw.update(changes)
        return Solver(self.geometry, self.eps_list, kw["max_iter"], self.tol, self.pos, self.check_every,
                      acceleration=kw["acceleration"], pool=self.pool)

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

    def along(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-position mask ``(n,)`` shaped to broadcast over (positions, tokens)."""
        return mask if self.pos == 1 else mask[:, None]

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

    # -- the domain's operations, which the acceleration strategies call -----------------

    def error(self, mass, old, new, eps) -> torch.Tensor:
        scratch = self.pool.take(new)
        err = marginal_error(mass, old, new, eps, self.tokens, out=scratch)
        self.pool.give(scratch)
        return err

    def transform(self, log_w: torch.Tensor, pot: torch.Tensor, eps: float, rows: torch.Tensor) -> torch.Tensor:
        """``T_w(pot)_i = −ε·log Σ_j w_j exp((pot_j − C_ij)/ε)``; rows stacked freely.

        One tensor per call, from the pool (the sparse kernel writes its result over its
        input): at V = 100k fresh tensors page-fault, and that had cost more than the kernel."""
        h = torch.add(log_w, pot, alpha=1 / eps, out=self.pool.take(pot))
        return self.geometry(h, eps, rows, out=h, scale=-eps)

    def column_update(self, log_w, pot, eps, rows):
        """The pair's column update ``g = T_a(f)`` (:meth:`transform`)."""
        return self.transform(log_w, pot, eps, rows)

    def pair_error(self, mass, old, new, eps):
        """The pair's marginal error (:meth:`error`)."""
        return self.error(mass, old, new, eps)

    def row_update(self, block: HeavyBlock | None, log_b, g, eps, rows, plain: bool = True):
        """``(T_b(g), f)``: the plain row update (for the marginal error) and the
        accelerated one (the heavy block solved; the plain one without a block). The
        plain one only if ``plain`` (on the iterations that check the error)."""
        if block is None:
            f = self.transform(log_b, g, eps, rows)
            return f, f
        h = torch.add(log_b, g, alpha=1 / eps, out=self.pool.take(g))
        block.mask(h)
        log_rest = self.geometry(h, eps, rows, out=h)
        f_plain, f = block.solve(log_rest, g, self.tol, plain)
        self.pool.give(h)
        return f_plain, f

    # -- the problems ----------------------------------------------------------------------

    def anneal(self, log_w: torch.Tensor, pot: torch.Tensor, swap: bool, rows, iterations: int = 0) -> State:
        """One averaged update per ε of the schedule but the last, for two problems stacked
        along the positions (one kernel call each): ``pot ← ½(pot + T_w(src))`` with
        ``src = pot``, or pot's two halves swapped when ``swap`` (each problem's potential
        from the other's). ``pot`` is the solver's own (it may go to the pool); the state's
        ``f`` is the stacked result."""
        state = State(f=pot, iterations=iterations)
        for eps in self.eps_list[:-1]:
            pot = state.f
            src = self.cat(self.split(pot, 2)[::-1]) if swap else pot
            new = self.transform(log_w, src, eps, rows).add_(pot).mul_(0.5)
            self.pool.give(pot, *([src] if swap else []))
            state = state.set(f=new, iterations=state.iterations + 1)
        return state

    def symmetric(self, a, log_a, f, rows, iterations: int = 0) -> State:
        """Potential of OT_ε(a, a): the fixed point of ``f ← ½(f + T_a(f))``, from ``f``
        (the solver's own: it is updated, and may go to the pool). The state's ``f`` is
        the last averaged iterate."""
        eps, n = self.eps_list[-1], self.positions(f)
        state = State(f=f, error=torch.zeros(n, dtype=f.dtype, device=f.device), iterations=iterations)
        active = torch.arange(n, device=f.device)
        for it in range(self.max_iter):
            take = self.taker(active, n)
            fa = take(state.f)
            tf = self.transform(take(log_a), fa, eps, rows[active])
            state = state.set(iterations=state.iterations + 1)
            check = self.checks(it, self.max_iter)
            if check:
                e = self.error(take(a), fa, tf, eps)
                state = state.measured(active, e)
            state = state.set(f=self.put(state.f, active, tf.add_(fa).mul_(0.5)))
            if check:
                active = active[e > self.tol]
                if active.numel() == 0:
                    break
        return state

    def pair(self, a, b, log_a, log_b, g, rows, iterations: int = 0) -> State:
        """Potentials of OT_ε(a, b) from the warm start ``g``, by the acceleration strategy;
        one that is abandoned hands over to plain updates (:meth:`fall_back`)."""
        state = self.acceleration.pair(self, a, b, log_a, log_b, g, rows, iterations)
        return self.fall_back(state, a, b, log_a, log_b, rows) if state.fell_back else state

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """A potential from this domain's units (the log domain's are potentials)."""
        return x

    def fall_back(self, state: State, a, b, log_a, log_b, rows) -> State:
        """Plain updates, in the log domain, from the abandoned loop's best iterate
        (``state.g``) with the budget left (``max_iter`` less every iteration so far, at
        least 2): a new solver, so this one's settings stay as built."""
        LOG.debug("SinkhornDivergence: %s; plain iterations from the best iterate", state.fell_back)
        plain = self.log_solver(acceleration=PLAIN, max_iter=max(self.max_iter - state.iterations, 2))
        out = plain.pair(a, b, log_a, log_b, self.potential(state.g), rows, state.iterations)
        return out.set(fell_back=state.fell_back)

    def pair_where(self, todo: torch.Tensor, a, b, log_a, log_b, g, rows, iterations: int = 0, start=None) -> State:
        """:meth:`pair` on the positions ``todo`` only, from ``start`` (default ``g``);
        elsewhere ``f = g`` (the solution where a = b). The state spans all positions
        (its error: the solved ones')."""
        start = g if start is None else start
        if bool(todo.all()):
            return self.pair(a, b, log_a, log_b, start, rows, iterations)
        pick = todo.nonzero()[:, 0]
        f_all, g_all = g.clone(), g.clone()
        if pick.numel():
            take = lambda x: x.index_select(self.pos, pick)  # noqa: E731
            state = self.pair(take(a), take(b), take(log_a), take(log_b), take(start), rows[pick], iterations)
            f_all.index_copy_(self.pos, pick, state.f)
            g_all.index_copy_(self.pos, pick, state.g)
            return state.set(f=f_all, g=g_all)
        return State(f=f_all, g=g_all, iterations=iterations)


def solve_chunk(solver: Solver, p: torch.Tensor, q: torch.Tensor, debias: bool, warm: dict | None = None):
    """Value and ``∂/∂p`` (up to a constant) of S_ε (or OT_ε) for a chunk of positions
    (``p``, ``q`` and ``∂/∂p`` in the solver's layout), and the solve's info.

    Where ``p = q`` bit for bit, OT(p, q) *is* OT(p, p): the pair takes the symmetric
    solve's potential (f = g = f_pp), so S_ε = 0 and ``h = f_pq − f_pp = 0`` exactly, not
    up to the two solves' different rounding (float32 Newton steps had left 1e-3 there).
    The value is clamped at 0 (S_ε ≥ 0 and OT_ε ≥ 0; a negative value is rounding), with
    ``h = 0`` where it was: the gradient of ``max(S, 0)``.

    ``warm``: potentials ``{"sym", "pair"}`` of an earlier solve of this shape at this ε
    (see :func:`~._full.solve_full_chunk`): the ε schedule is skipped and the problems
    start from them; they are replaced by this solve's on return. A start changes only
    the iterations needed, never the stopping rule (marginal error ≤ tol)."""
    log_p, log_q = log_probs(p), log_probs(q)
    n = solver.positions(p)
    rows = torch.arange(n, device=p.device)
    rows2 = rows.repeat(2)
    shape = list(p.shape)
    shape[solver.pos] *= 2
    info: dict = {}
    tokens = solver.tokens
    start = warm.get("pair") if warm else None
    iterations = 0
    if debias:
        # anneal the self-transport potentials f_pp, g_qq (each updated from itself); the
        # pair then starts from g_qq, so only two problems pay the ε schedule
        log_pq = solver.cat([log_p, log_q])
        if warm and "sym" in warm:
            both = warm["sym"].clone()
        else:
            annealed = solver.anneal(log_pq, p.new_zeros(shape), False, rows2)
            both, iterations = annealed.f, annealed.iterations
        sym = solver.symmetric(solver.cat([p, q]), log_pq, both, rows2, iterations)
        both, iterations = sym.f, sym.iterations
        fpp, gqq = solver.split(both, 2)
        info["marginal_error_sym"] = sym.max_error
        same = (p == q).all(tokens)  # OT(p, q) = OT(p, p): one solve for the three problems
        gqq = torch.where(solver.along(same), fpp, gqq) if bool(same.any()) else gqq
        g = gqq  # warm start from OT(q, q)'s potential: the solution itself when p = q
    else:  # f ← T_q(g), g ← T_p(f): the pair's ε schedule, from g's end
        if start is None:
            annealed = solver.anneal(solver.cat([log_q, log_p]), p.new_zeros(shape), True, rows2)
            f, g = solver.split(annealed.f, 2)
            iterations = annealed.iterations
        else:
            g = start
        same = torch.zeros(n, dtype=torch.bool, device=p.device)
    pair = solver.pair_where(~same, p, q, log_p, log_q, g, rows, iterations, start)
    f, g = pair.f, pair.g
    if warm is not None:
        warm.update(pair=g.clone(), **({"sym": both.clone()} if debias else {}))
    info["marginal_error"] = pair.max_error
    value = (p * f).sum(tokens) + (q * g).sum(tokens)
    grad = f
    if debias:  # OT(a, a) = 2⟨a, f_aa⟩
        value = value - (p * fpp).sum(tokens) - (q * gqq).sum(tokens)
        grad = f - fpp
    below = value <= 0  # p = q gives exactly 0 here already
    if bool(below.any()):
        value = value.clamp(min=0)
        grad = grad.masked_fill(solver.along(below), 0.0)
    info["iterations"] = pair.iterations
    info["fell_back"] = pair.fell_back
    return value, grad, info


#: Default scratch memory for one chunk of positions (the gathered (rows, V, width) block).
CHUNK_BYTES = 128 * 2**20
#: The same on a GPU, for the Triton kernel's (V,)-vectors per position: large chunks keep
#: it busy, and every chunk pays the solver's per-iteration launches and syncs.
GPU_CHUNK_BYTES = 4 * 2**30


def solver_chunk_rows(vocab_size: int, dtype: torch.dtype, device: torch.device, *,
                      kernel: SparseLogKernel | None = None, support: int | None = None,
                      slot_map: bool = False) -> int:
    """Positions per chunk under the Sinkhorn solvers' memory model: the budget over one
    position's scratch (the closed-form penalties size theirs by elements, ``_inputs.chunk_rows``).

    The budget is ``CHUNK_BYTES`` (``GPU_CHUNK_BYTES`` on a GPU). Full vocabulary
    (``kernel``): the fused kernels (numba, Triton) keep ~16 (V,) vectors per position (4
    stacked problems' potentials, weights and scratch) in at least ``FUSED_CHUNK_BYTES``
    (more positions per call amortize the table reads), numba's chunk a multiple of
    ``FUSED_CHUNK_ALIGN``; the torch path gathers 4 stacked problems' (V, width) blocks
    while annealing. Support mode (``support = m``, s = 2m + 1): 4 problems' (s, s) costs,
    the chunk's (V,) rows and, with ``slot_map``, the support's int32 (V,) slot map.
    """
    item = torch.finfo(dtype).bits // 8
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    if support is None:
        if kernel.path != "torch":
            per_row = 16 * vocab_size * item
            budget = max(budget, FUSED_CHUNK_BYTES)
        else:
            per_row = 4 * vocab_size * kernel.width * item
    else:
        s = 2 * min(support, vocab_size) + 1
        per_row = 4 * s * s * item + 4 * vocab_size * item + (4 * vocab_size if slot_map else 0)
    rows = max(1, int(budget // per_row))
    if kernel is not None and kernel.path == "numba" and rows > FUSED_CHUNK_ALIGN:
        rows -= rows % FUSED_CHUNK_ALIGN
    return rows
