"""The full-vocabulary Sinkhorn in the scaling domain: no ``exp`` or ``log`` per iteration.

With scalings ``φ = e^{f/ε}``, ``ψ = e^{g/ε}`` the updates of :mod:`._solver` read

.. math::

    φ = T_b(ψ) = 1 / K(b ⊙ ψ),\\qquad (K w)_i = δ Σ_j w_j + Σ_{j∈N(i)} S_{ij} w_j,

with ``δ = e^{−cap/ε}`` and ``S = e^{−C/ε} − δ ≥ 0`` on the stored entries (the sparse
kernel's CSR table, :mod:`._kernel`). One kernel application is a multiply pass
(``w = b ⊙ ψ`` and its column sums) and one sparse pass that ends each row with a
reciprocal: two passes over (V, n) where the log-domain kernel makes nine (shift, exp,
sum, log, …). The symmetric update ``½(f + T_a(f))`` is ``√(φ · T_a(φ))``, the marginal
error ``Σ_j m_j |e^{(old−new)/ε} − 1|`` is ``Σ_j m_j |φ_old/φ_new − 1|``, and the heavy
block (:mod:`._heavy`) reads ``A = K(b ⊙ ψ)`` with the heavy tokens masked directly.
Same equations, same fixed point: only the arithmetic differs.

Why it is safe: entries of K lie in ``[δ, 1]``, so a sum ``K w`` lies in ``[δ Σw, Σw]``
and every scaling within ``e^{cap/ε}`` of its position's others. The CPU solver
(:class:`~._scaling_solver.ScalingSolver`) takes this path for ``cap/ε ≤ SCALING_RANGE[dtype]`` (40
in float32, 300 in float64); every sparse pass checks its sums against
``SUM_RANGE[dtype]``, and a problem whose sums leave it is redone in the log domain from
its start (:class:`OutOfRange`). Potentials enter and leave as potentials (one ``exp`` and
one ``log`` pass per problem), so warm starts and the value are the log solver's.

Cost per iteration and position: O(V·k) multiply-adds and two O(V) passes. The sparse pass
is the log-domain kernel's inner loop; the seven passes around it (shift, exp, sums, log,
rescale) and the heavy block's ~12 torch passes over (V, n) become the multiply pass, the
reciprocal and one numba pass each for the far-row histogram and potentials. Passes that
sum per position run on blocks of tokens with local accumulators (:func:`by_blocks`), so
their inner loop over the positions vectorizes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..._util.jit import compile_once
from ._heavy import BINS, HeavyBlock
from .._numba import prefetch, run_rows

LOG = logging.getLogger(__name__)

#: The largest cap/ε the scaling domain is used for, per compute dtype: scalings then span
#: at most e^40 (float32) or e^300 (float64) within a position.
SCALING_RANGE = {torch.float32: 40.0, torch.float64: 300.0}
#: The range a sparse sum must stay in (else the problem is redone in the log domain).
SUM_RANGE = {torch.float32: (1e-30, 1e30), torch.float64: (1e-280, 1e280)}


class OutOfRange(ArithmeticError):
    """A scaling-domain sum left ``SUM_RANGE``: the caller redoes the problem in the log domain."""


def scaling_applies(kernel, eps: float) -> bool:
    """Whether :class:`ScalingSolver` runs on ``kernel`` at ``eps``: the fused CPU path
    (numba) and ``cap/ε`` within ``SCALING_RANGE``."""
    return kernel.path == "numba" and kernel.cap / eps <= SCALING_RANGE.get(kernel.dtype, 0.0)


def by_blocks(kernel, n_rows: int, width: int, *shared, extra: tuple = ()) -> np.ndarray:
    """``kernel(parts, bounds, *shared, tot)`` on equal blocks of the ``n_rows`` tokens, one
    per torch thread; returns the blocks' per-position totals summed, float64 (width,)."""
    blocks = max(1, min(torch.get_num_threads(), n_rows))
    bounds = np.linspace(0, n_rows, blocks + 1).astype(np.int64)
    tot = np.zeros((blocks, *extra, width))
    run_rows(kernel, (np.arange(blocks),), (bounds, *shared, tot))
    return tot.sum(0)


class LinearKernel:
    """``w ↦ K w`` and ``ψ ↦ 1/K(m ⊙ ψ)`` on a :class:`~._kernel.SparseLogKernel`'s CSR
    table at one ε, token-major (V, n) in the kernel's compute dtype (numba, threads)."""

    def __init__(self, kernel, eps: float):
        self.kernel, self.eps = kernel, eps
        self.delta = math.exp(-kernel.cap / eps)
        self.weights = kernel.csr_weights(eps)[1]  # S per stored entry, compute dtype
        self.lo, self.hi = SUM_RANGE[kernel.dtype]

    def weigh(self, mass: torch.Tensor, scaling: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = mass ⊙ scaling``; returns its column sums (float64 (n,))."""
        V, n = mass.shape
        return torch.from_numpy(by_blocks(kernels().weigh, V, n, mass.numpy(), scaling.numpy(), out.numpy()))

    def apply(self, w: torch.Tensor, total: torch.Tensor, out: torch.Tensor, invert: bool) -> torch.Tensor:
        """``out = K w`` (``invert``: its reciprocal), with ``total = Σ_j w_j`` (n,);
        raises :class:`OutOfRange` where a sum leaves ``SUM_RANGE`` (``K w ≥ 0`` only
        without ``invert``)."""
        k = self.kernel
        indptr, nbr, _ = k.csr
        base = (total * self.delta).to(k.dtype).numpy()
        bad = k._low  # the kernel's (V,) flag scratch
        lo = self.lo if invert else 0.0
        run_rows(kernels().apply, (k._tokens, k._far), (indptr, nbr, self.weights, w.numpy(), base, lo, self.hi,
                                                         invert, out.numpy(), bad), cumulative=indptr)
        if bad.any():
            raise OutOfRange(f"a sparse sum left [{lo:g}, {self.hi:g}] at ε = {self.eps:g}")
        return out

    def update(self, mass: torch.Tensor, scaling: torch.Tensor, pool) -> torch.Tensor:
        """``T_m(ψ) = 1/K(m ⊙ ψ)`` into a tensor from ``pool`` (:class:`~._solver.Pool`)."""
        w = pool.take(scaling)
        total = self.weigh(mass, scaling, w)
        out = self.apply(w, total, pool.take(scaling), invert=True)
        pool.give(w)
        return out

    @staticmethod
    def ratio_error(mass: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``Σ_j m_j |old_j/new_j − 1|`` per position: the marginal error on scalings."""
        V, n = mass.shape
        return torch.from_numpy(by_blocks(kernels().ratio_error, V, n, mass.numpy(), old.numpy(),
                                          new.numpy())).to(old.dtype)

    @staticmethod
    def average(mass: torch.Tensor, old: torch.Tensor, new: torch.Tensor, check: bool) -> torch.Tensor | None:
        """``new ← √(old · new)`` in place (the symmetric update); ``old``'s marginal error
        (:meth:`ratio_error`) if ``check``, in the same pass."""
        V, n = mass.shape
        err = by_blocks(kernels().average, V, n, mass.numpy(), old.numpy(), new.numpy(), check)
        return torch.from_numpy(err).to(old.dtype) if check else None


class ScaledHeavyBlock(HeavyBlock):
    """:class:`~._heavy.HeavyBlock` in the scaling domain: reads ``A = K(b ⊙ ψ)`` with the
    heavy tokens masked (in units of the masked mass Σw) and returns scalings."""

    def __init__(self, a, b, csr, cap, eps, h):
        super().__init__(a, b, csr, cap, eps, h)
        self.a_far = self.a_far.to(a.dtype)  # the numba histogram reads it in a's dtype

    def mask(self, w: torch.Tensor, total: torch.Tensor) -> None:
        """Zero the heavy tokens' weights of ``w (V, r)`` in place; take them off ``total``."""
        cols = torch.arange(w.shape[1], device=w.device)[:, None]
        total.sub_(w[self.heavy, cols].double().sum(1))
        w[self.heavy, cols] = 0.0

    def solve_scaled(self, rest: torch.Tensor, psi: torch.Tensor, total: torch.Tensor, tol: float,
                     plain: bool, pool):
        """``(φ_plain, φ)`` from ``A = rest (V, r)`` (the masked kernel's output, with
        ``total`` its masked mass): the plain update ``1/(A + Σ_H b ψ K)`` (None unless
        ``plain``) and the one after the block solve, in ``rest``'s dtype; the near rows
        exact (float64), the far rows ``1/(A + δ Σu)``."""
        r = rest.shape[1]
        scale = torch.where(total > 0, total, 1.0).clamp_min(1e-300)  # A ∈ [δ, 1]·scale
        rest_near = rest.gather(0, self.near.t()).t().double().div_(scale[:, None])  # (r, L)
        V = rest.shape[0]
        blocks = max(1, min(torch.get_num_threads(), V))
        bounds = np.linspace(0, V, blocks + 1).astype(np.int64)
        hist = np.zeros((2, blocks, r, BINS))  # the a-weights and the a-weighted sums, per block
        lo = self.log_delta - 1e-6
        run_rows(kernels().histogram, (np.arange(blocks),), (bounds, rest.numpy(), self.a_far.numpy(),
                                                              (1 / scale).numpy(), lo, BINS / -lo, *hist))
        weight, mean = torch.from_numpy(hist.sum(1))
        far_rest = torch.where(weight > 0, mean / weight.clamp_min(1e-300), 1.0)
        psi_heavy = psi.t().gather(1, self.heavy).double()
        x0 = torch.where(self.live, (self.b_heavy * psi_heavy).clamp_min(1e-300).log() - scale.log()[:, None],
                         float("-inf"))
        x = self.newton(x0, rest_near, far_rest, weight, tol)
        out = pool.take(rest)
        out_plain = pool.take(rest) if plain else out
        delta = math.exp(self.log_delta)
        extra, extra_plain = ((delta * at.exp().sum(1) * scale).to(rest.dtype) for at in (x, x0))
        by_blocks(kernels().far_potential, rest.shape[0], r, rest.numpy(), extra.numpy(), extra_plain.numpy(),
                  plain, out.numpy(), out_plain.numpy())
        pos = torch.arange(r, device=rest.device)[:, None].expand_as(self.near)
        rows, cols = self.near[self.near_valid], pos[self.near_valid]
        for target, at in ((out, x), (out_plain, x0)) if plain else ((out, x),):
            s_near = self.near_sums(rest_near, at.exp())
            target[rows, cols] = (1 / (s_near * scale[:, None]))[self.near_valid].to(rest.dtype)
        return (out_plain if plain else None), out


@compile_once
def kernels(numba):
    """The scaling domain's numba passes (cached on disk). ``apply`` runs on a block of
    tokens (rows of the CSR table); the others on a block of positions ``cols``
    (contiguous), looping over every token, so their per-position sums need no merging."""

    fetch = prefetch()
    ahead = 8
    Kernels = type("Kernels", (), {})
    out = Kernels()

    @numba.njit(cache=True, nogil=True, fastmath={"contract"})
    def apply(tokens, far, indptr, nbr, k, w, base, lo, hi, invert, out, bad):
        n = w.shape[1]
        nnz = nbr.shape[0]
        line = 64 // w.itemsize
        for x in range(tokens.shape[0]):
            i = tokens[x]
            acc = out[i]
            acc[:] = base
            for t in range(indptr[i], indptr[i + 1]):
                if far[x] and t + ahead < nnz:
                    for col in range(0, n, line):
                        fetch(w, nbr[t + ahead], col)
                kij = k[t]
                row = w[nbr[t]]
                for r in range(n):
                    acc[r] += kij * row[r]
            outside = 0
            for r in range(n):
                s = acc[r]
                outside += not (s >= lo and s <= hi)
            bad[i] = outside > 0
            if invert:
                for r in range(n):
                    acc[r] = 1.0 / acc[r]

    # the passes below run on blocks of tokens (``parts`` of ``bounds``), each summing its
    # per-position totals into its own row of ``tot`` (P, n): local float64 accumulators,
    # so the inner loop over the positions vectorizes
    @numba.njit(cache=True, nogil=True, fastmath=True)
    def weigh(parts, bounds, mass, scaling, out, tot):
        for p in parts:
            acc = np.zeros(mass.shape[1], np.float64)
            for i in range(bounds[p], bounds[p + 1]):
                mi, si, oi = mass[i], scaling[i], out[i]
                for r in range(mi.shape[0]):
                    v = mi[r] * si[r]
                    oi[r] = v
                    acc[r] += v
            tot[p] += acc

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def ratio_error(parts, bounds, mass, old, new, tot):
        for p in parts:
            acc = np.zeros(mass.shape[1], np.float64)
            for i in range(bounds[p], bounds[p + 1]):
                mi, oi, ni = mass[i], old[i], new[i]
                for r in range(mi.shape[0]):
                    acc[r] += mi[r] * abs(oi[r] / ni[r] - 1.0)
            tot[p] += acc

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def average(parts, bounds, mass, old, new, check, tot):
        for p in parts:
            acc = np.zeros(mass.shape[1], np.float64)
            for i in range(bounds[p], bounds[p + 1]):
                mi, oi, ni = mass[i], old[i], new[i]
                if check:
                    for r in range(mi.shape[0]):
                        acc[r] += mi[r] * abs(oi[r] / ni[r] - 1.0)
                for r in range(mi.shape[0]):
                    ni[r] = math.sqrt(oi[r] * ni[r])
            tot[p] += acc

    @numba.njit(cache=True, nogil=True)
    def histogram(parts, bounds, rest, a_far, inv_scale, lo, per_unit, weight, mean):
        # weight, mean: (P, n, B), one histogram per block
        top = weight.shape[2] - 1
        for p in parts:
            w, mu = weight[p], mean[p]
            for i in range(bounds[p], bounds[p + 1]):
                ri, ai = rest[i], a_far[i]
                for r in range(ri.shape[0]):
                    m = ai[r]
                    if m == 0:
                        continue
                    x = ri[r] * inv_scale[r]
                    b = int((math.log(x) - lo) * per_unit) if x > 0 else 0
                    b = min(max(b, 0), top)
                    w[r, b] += m
                    mu[r, b] += m * x

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def far_potential(parts, bounds, rest, extra, extra_plain, plain, out, out_plain, tot):
        for p in parts:
            for i in range(bounds[p], bounds[p + 1]):
                ri, oi, qi = rest[i], out[i], out_plain[i]
                for r in range(ri.shape[0]):
                    oi[r] = 1.0 / (ri[r] + extra[r])
                if plain:
                    for r in range(ri.shape[0]):
                        qi[r] = 1.0 / (ri[r] + extra_plain[r])

    for fn in (apply, weigh, ratio_error, average, histogram, far_potential):
        setattr(out, fn.__name__, fn)
    return out
