"""The fused support-mode Sinkhorn solver (Triton): one kernel launch solves a chunk's
debiased problems OT(p, q), OT(p, p), OT(q, q), every iteration inside the kernel.

Per position the support is the one :func:`~._support.support_problem` builds: the
s₁ = 2m tokens top-m(p) ∪ top-m(q) (a duplicate carries no mass) plus a rest bin at cost
``cap`` from every other point. One program solves one position, its s₁ × s₁ cost in
registers (padded to ``TOKENS``, a power of two ≥ s₁, with ``cap``); the rest bin is
carried as a scalar beside the tile, so m = 64 takes a 128 × 128 tile, not 256 × 256.

In the log domain (exact: no range check, no fallback), with ``w`` a support's masses,

.. math::

    T_w(φ)_i = −ε \\log\\Big(\\sum_{j ≤ s₁} w_j e^{(φ_j − C_{ij})/ε} + w_r e^{(φ_r − \\mathrm{cap})/ε}\\Big),
    \\qquad T_w(φ)_r = −ε \\log\\Big(\\sum_j w_j e^{(φ_j − \\mathrm{cap})/ε} + w_r e^{φ_r/ε}\\Big).

The program runs the schedule of :mod:`._solver`: the self-transport potentials
``φ ← ½(φ + T_a(φ))`` annealed over the ε schedule (one update per ε), then iterated at the
target ε until the L1 marginal error ``Σ_j a_j |e^{(φ_j − T_a(φ)_j)/ε} − 1| ≤ tol``; then
the pair from OT(q, q)'s potential by alternating updates ``f = T_q(g)``, ``g = T_p(f)``
to the same rule — each position stops on its own. Where p = q bit for bit the pair is
OT(p, p) itself and the value and gradient are exactly 0. Alternating updates, not the
torch path's Newton steps (an s × s solve per step does not fit a program): positions
that reach ``max_iter`` above ``max(tol, ACCEPT_FLOOR)`` are handed back (``converged``
False) and the caller solves them again on the torch path, so no unconverged number
leaves the solver.

Outputs per position: the value ``S_ε = ⟨p, f⟩ + ⟨q, g⟩ − ⟨p, f_pp⟩ − ⟨q, g_qq⟩`` (clamped
at 0), the gradient potential ``h = f − f_pp`` on the s₁ + 1 points (0 where clamped) —
the envelope gradient ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` is written from it by
:func:`~._support.write_support_gradient` — the final marginal error and the kernel
applications taken.

Cost per position and iteration: 2 · s₁² exp (one transform for each symmetric problem,
or for each side of the pair), O(s₁²) registers per program; no global memory traffic
inside the loop. Triton is optional: :func:`support_sinkhorn_kernel` returns None without
it; with ``TRITON_INTERPRET=1`` set before Triton's import the same kernel runs on CPU
tensors (how the tests check it without a GPU).
"""

from __future__ import annotations

import functools
import os

import torch

#: The largest register tile (support tokens, padded): m ≤ 64. Beyond it the tile would
#: spill out of registers, and the torch path (Newton steps) runs instead.
MAX_TOKENS = 128
#: Iterations the fused solver may take per problem, per ``max_iter`` of the torch path
#: (whose pair takes Newton steps, each worth many alternating updates).
ITERATIONS_PER_NEWTON_STEP = 20
#: The smallest marginal error the fused solver is held to, per compute dtype: below it
#: float32 rounding stalls the iteration, as the torch path's Newton steps stall there too.
ACCEPT_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}


def tokens_tile(support_tokens: int) -> int:
    """The register tile's side for ``support_tokens`` = s₁ points: the next power of two (≥ 16)."""
    return max(16, 1 << max(0, support_tokens - 1).bit_length())


def warps_for(tile: int) -> int:
    """Warps per program: 8 float32 elements of the cost tile per thread (2, 4, 16, 32 warps
    at tiles 16, 32, 64, 128). ``ptxas -v`` for sm_90 (Triton 3.9, float32): tiles 16–64
    then use 72–128 registers and spill nothing; 4 warps at tile 64 had used 255 and
    spilled. The 128 × 128 tile (m = 33…64) spills 1.1 KB per thread at 32 warps (2.2 KB
    reloaded per iteration, from L1): the cost of m = 64 in registers, to be measured."""
    return max(2, min(32, tile * tile // 256))


@functools.cache
def support_sinkhorn_kernel():
    """``f(a, b, cost, eps_list, cap, tol, max_iter) -> (value, h, error, iterations)``, or
    None without Triton.

    Shapes: ``a, b (r, s₁ + 1)`` the supports' masses (the rest bin last), ``cost (r, s₁, s₁)``
    the support tokens' costs (symmetric, 0 on the diagonal), ``eps_list`` the ε schedule
    (a float list, the target last). Returns ``value (r,)``, ``h (r, s₁ + 1)``,
    ``error (r,)`` (the pair's marginal error; the largest of the three problems') and
    ``iterations (r,)`` int32 (kernel applications, summed over the problems), all on a's
    device in a's dtype (float32 or float64)."""
    try:
        from ._fused_support_kernel import solve_positions
    except ImportError:
        return None

    def run(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, eps_list: list[float], cap: float,
            tol: float, max_iter: int):
        rows, width = a.shape
        tokens = width - 1
        tile = tokens_tile(tokens)
        if tile > MAX_TOKENS:
            raise ValueError(f"fused support solver: {tokens} support tokens exceed the tile of {MAX_TOKENS}")
        a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
        eps_t = torch.tensor(eps_list, dtype=torch.float64, device=a.device)
        value = torch.empty(rows, dtype=a.dtype, device=a.device)
        h = torch.empty_like(a)
        err = torch.empty(rows, dtype=a.dtype, device=a.device)
        iterations = torch.zeros(rows, dtype=torch.int32, device=a.device)
        if rows:
            solve_positions[(rows,)](a, b, cost, eps_t, value, h, err, iterations, len(eps_list), tokens, float(cap),
                            float(tol), int(max_iter), TOKENS=tile, num_warps=warps_for(tile))
        return value, h, err, iterations

    return run


def fused_unavailable(device: torch.device, support: int, vocab_size: int, debias: bool) -> str | None:
    """Why the fused solver cannot take this problem (None: it can).

    It needs Triton, a CUDA device (or Triton's interpreter, ``TRITON_INTERPRET=1``, on CPU
    tensors), debiasing (the biased pair anneals differently) and s₁ = 2·min(m, V) support
    tokens within :data:`MAX_TOKENS`."""
    if not debias:
        return "it solves the debiased divergence only (debias=True)"
    tokens = 2 * min(support, vocab_size)
    if tokens_tile(tokens) > MAX_TOKENS:
        return f"support={support} gives {tokens} support tokens, above its tile of {MAX_TOKENS} (m <= {MAX_TOKENS // 2})"
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"it runs on CUDA devices (or with TRITON_INTERPRET=1 on CPU), got {device}"
    if support_sinkhorn_kernel() is None:
        return "Triton is not installed (pip install triton)"
    return None


def solve_support_fused(p, q, *, support, table, cap, embeddings, scratch, eps_list, max_iter, tol, debias,
                        dz_out=None):
    """:func:`~._support.solve_support_chunk` with the solve in one Triton launch: the same
    arguments and results (value ``(rows,)``, info; ``∂S/∂z`` into ``dz_out``).

    Positions the fused loop leaves above ``max(tol, ACCEPT_FLOOR)`` after
    ``ITERATIONS_PER_NEWTON_STEP · max_iter`` iterations are solved again by the torch
    path (Newton steps); ``info["fused_redone"]`` counts them."""
    from ._support import solve_support_chunk, support_problem, write_support_gradient

    rows, V = p.shape
    slots = None
    if embeddings is None:
        if scratch.get("slots") is None or scratch["slots"].shape[0] < rows:
            scratch["slots"] = torch.full((rows, V), -1, dtype=torch.int32, device=p.device)
        slots = scratch["slots"][:rows]
    index, costs = table
    a, b, cost, ids, dup = support_problem(p, q, support, index, costs, cap, embeddings, slots)
    tokens = ids.shape[1]
    inner = cost[:, :tokens, :tokens]
    value, h, err, iterations = support_sinkhorn_kernel()(
        a, b, inner, eps_list, cap, tol, ITERATIONS_PER_NEWTON_STEP * max_iter)
    accept = max(tol, ACCEPT_FLOOR.get(p.dtype, ACCEPT_FLOOR[torch.float32]))
    redo = (err > accept) | ~torch.isfinite(value)
    info = {"iterations": int(iterations.max()) if rows else 0, "fused_redone": 0}
    if bool(redo.any()):
        pick = redo.nonzero()[:, 0]
        sub_dz = None if dz_out is None else torch.empty((len(pick), V), dtype=p.dtype, device=p.device)
        sub_value, sub_info = solve_support_chunk(
            p[pick], q[pick], support=support, table=table, cap=cap, embeddings=embeddings, scratch={},
            eps_list=eps_list, max_iter=max_iter, tol=tol, debias=debias, dz_out=sub_dz)
        value[pick] = sub_value
        err[pick] = sub_info["marginal_error"]
        info["fused_redone"] = len(pick)
        info["iterations"] = max(info["iterations"], sub_info["iterations"])
    info["marginal_error"] = float(err.max()) if rows else 0.0
    info["marginal_error_sym"] = info["marginal_error"]
    if dz_out is not None:
        write_support_gradient(p, ids, dup, h, dz_out)
        if bool(redo.any()):
            dz_out[pick] = sub_dz
    return value, info

