"""The full-vocabulary routine's solve of a chunk: the solver chosen once, warm starts, ∂S/∂z.

The solver is picked when it is built, never switched mid-solve: the scaling domain
(:class:`~._scaling_solver.ScalingSolver`) where the heavy-block acceleration runs on the
numba path with ``cap/ε`` in range (:func:`~._scaling.scaling_applies`), the log domain
(:class:`~._solver.Solver`) otherwise; the acceleration is a strategy object
(:func:`~._acceleration.full_acceleration`: ``"newton"``/``"auto"`` the heavy-token block
Newton, ``"overrelax"`` over-relaxation with ω = ``relaxation``, ``"none"`` plain updates).
Every one stops at the same rule (marginal error ≤ tol) and has the same fixed point, value
and gradient; a fall-back (an abandoned acceleration, sums out of the scaling range) is a
hand-off to another solver from the state the first returned.

Cost per iteration and position: O(V·k) (about 3 kernel applications per iteration: the
pair and the two symmetric problems), plus O(V) to lay p and q out token-major and the
gradient back.
"""

from __future__ import annotations

import torch

from ._acceleration import full_acceleration
from ._kernel import SparseLogKernel
from ._scaling import scaling_applies
from ._scaling_solver import ScalingSolver
from ._solver import Solver, solve_chunk


def full_solver(kernel: SparseLogKernel, eps_list: list[float], max_iter: int, tol: float, *,
                acceleration: str = "auto", relaxation: float = 1.5) -> Solver:
    """The solver for ``acceleration=`` on ``kernel``, its domain fixed here."""
    strategy = full_acceleration(acceleration, relaxation)
    if acceleration in ("auto", "newton") and scaling_applies(kernel, eps_list[-1]):
        return ScalingSolver(kernel, eps_list, max_iter, tol, acceleration=strategy)
    return Solver(kernel, eps_list, max_iter, tol, pos=1, check_every=2, acceleration=strategy)


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
    solver = full_solver(kernel, eps_list, max_iter, tol, acceleration=acceleration, relaxation=relaxation)
    value, h, info = solve_chunk(solver, p, q, debias, warm)
    if dz_out is not None:  # a zero-mass token gets no gradient, even if h is huge
        h = h.masked_fill_(p <= 0, 0.0)  # h is the chunk's own: in place
        h.sub_(torch.einsum("ji,ji->i", p, h)).mul_(p)
        torch.index_select(h.t().contiguous(), 1, rank, out=dz_out)
    return value, info
