"""The state of a Sinkhorn loop: a small frozen record that each step replaces.

As in ott-jax's ``SinkhornState``, a loop never flips a mode or a budget of its solver:
every step returns a new :class:`State` (:meth:`State.set`), and a loop that cannot go on
says why in the state it returns — an acceleration abandoned (``fell_back``) or a
scaling-domain sum out of range (``out_of_range``) — so that its caller hands the problem
to another solver (:meth:`~._solver.Solver.fall_back`,
:meth:`~._scaling_solver.ScalingSolver.in_log_domain`) from that state.

Potentials are (positions, tokens) or token-major (V, n) tensors, up to 51 MB each at
V = 100k and n = 128: a step moves them from the old state to the new one (updated in
place where only some positions are active, dead buffers handed to the solver's pool)
instead of copying them, so an old state is not read after the step that replaced it.
The per-position errors, (n,), are replaced, not edited.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class State:
    """One Sinkhorn loop's state.

    Attributes
    ----------
    f, g : Tensor or None
        The potentials (or, in the scaling domain, the scalings ``e^{f/ε}``, ``e^{g/ε}``)
        of the two sides, in the solver's layout; a symmetric problem or an ε schedule
        keeps its one potential in ``f``.
    error : Tensor (n,) or None
        The last measured L1 marginal error ``‖P 1 − a‖₁`` per position (None: not measured).
    iterations : int
        Kernel applications per row so far, summed over every problem of the chunk (the
        ε schedule, the symmetric problems, the pair): ``last_info["iterations"]``.
    fell_back : str or None
        Why the acceleration was abandoned (the warning's text); ``g`` then holds each
        position's best iterate, from which plain updates go on.
    out_of_range : str or None
        Why the scaling domain cannot go on (a sum left ``SUM_RANGE``): the problem is
        redone in the log domain from its start, with ``iterations`` counted on.
    """

    f: torch.Tensor | None
    g: torch.Tensor | None = None
    error: torch.Tensor | None = None
    iterations: int = 0
    fell_back: str | None = None
    out_of_range: str | None = None

    def set(self, **changes) -> "State":
        """A new state with ``changes`` (ott-jax's ``state.set``)."""
        return dataclasses.replace(self, **changes)

    def measured(self, active: torch.Tensor, error: torch.Tensor) -> "State":
        """A new state whose errors at the positions ``active`` are ``error``."""
        return self.set(error=self.error.index_put((active,), error.to(self.error.dtype)))

    @property
    def max_error(self) -> float:
        """The largest marginal error over the positions (0 when none was measured)."""
        return float(self.error.max()) if self.error is not None and self.error.numel() else 0.0
