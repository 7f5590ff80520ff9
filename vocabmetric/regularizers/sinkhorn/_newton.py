"""Newton's method for entropic OT between small dense problems (support-mode Sinkhorn).

Sinkhorn's alternating updates converge linearly, and slowly where the plan must move mass
through entries of ``exp(−C/ε)`` far below the diagonal's: at ε = cap/15, between two
peaked next-token distributions, a position needs 100–1000 alternating updates to reach an
L1 marginal error of 1e-4. For a support of s ≤ a few hundred points, Newton's method on
the semi-dual takes 5–10 steps instead, each an s × s solve.

With ``f = T_b(g)`` (the c-transform, so the plan's rows sum to ``a`` exactly)
and the plan ``P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)``, its column sums ``c = Pᵀ1``
move with ``g`` as

.. math::

    ∂c/∂g = \\frac{1}{ε} M,\\qquad M = \\mathrm{diag}(c) − P^T \\mathrm{diag}(1/a)\\, P,

a graph Laplacian (``M 1 = 0``: the potentials' gauge). A step solves
``(M + λ·diag(c)) d = b − c`` (λ = 1e-3 fixes the gauge and damps the directions that the
plan barely ties down) and moves ``g ← g + ε·clip(d, ±ρ)``: the clip (ρ = 2) keeps a point
whose column is nearly empty, where the linear model is far off, from jumping.
Cost per step and position: one c-transform (s²), the plan (s² exp), ``PᵀDP`` (s³
multiply-adds) and an LU solve (⅔ s³).
"""

from __future__ import annotations

from typing import Callable

import torch

#: The Levenberg–Marquardt damping λ; the trust radius ρ (in units of ε) at the start,
#: its largest, and the one below which a problem has stalled (at its dtype's precision).
DAMPING = 1e-3
RADIUS, MAX_RADIUS, MIN_RADIUS = 2.0, 256.0, 1e-3
STALL = 3


def newton_pair(
    transform: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    neg_cost: Callable[[torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Potentials ``(f, g)`` of OT_ε(a, b) for r small dense problems, from the warm start ``g``.

    ``a, b, log_a, log_b, g`` are ``(r, s)``; ``transform(log_w, pot, rows)`` is the
    c-transform ``−ε·log Σ_j w_j exp((pot_j − C_ij)/ε)`` of the problems ``rows``, and
    ``neg_cost(rows)`` their ``−C/ε`` ``(len(rows), s, s)``.

    A trust region keeps every step an ascent of the semi-dual ``F(g) = ⟨a, T_b(g)⟩ +
    ⟨b, g⟩`` (concave; the value OT_ε at its maximum): a step that lowers F is taken back
    and retried at a quarter of the radius, an accepted one doubles it. A problem stops
    once its L1 marginal error ``‖Pᵀ1 − b‖₁`` is at most ``tol``, or when it has stalled at
    its dtype's precision: a radius below ``MIN_RADIUS`` (no resolvable step ascends), or
    ``STALL`` accepted steps in a row that raise F by no more than rounding and do not
    lower the error.

    Returns ``(f, g, error (r,), evaluations)``: ``f = T_b(g)`` exactly, the errors at the
    returned pair, and the most c-transforms any problem took (``max_iter`` at most).
    """
    r = a.shape[0]
    g = g.clone()  # the last accepted point of each problem, with f, err, value there
    f = torch.empty_like(g)
    err = torch.zeros(r, dtype=g.dtype, device=g.device)
    value = torch.full((r,), float("-inf"), dtype=g.dtype, device=g.device)
    step = torch.zeros_like(g)  # the Newton step from g (in units of ε)
    radius = torch.full((r,), RADIUS, dtype=g.dtype, device=g.device)
    idle = torch.zeros(r, dtype=torch.int64, device=g.device)  # steps in a row without progress
    slack = 16 * torch.finfo(g.dtype).eps
    tiny = torch.finfo(g.dtype).tiny
    active = torch.arange(r, device=g.device)
    evaluations = 0
    while active.numel() and evaluations < max_iter:
        evaluations += 1
        lim = radius[active][:, None]
        trial = g[active] + eps * torch.maximum(torch.minimum(step[active], lim), -lim)
        aa, bb, lb = a[active], b[active], log_b[active]
        ft = transform(lb, trial, active)
        fa_, gb_ = aa * ft, bb * trial
        vt = fa_.sum(-1) + gb_.sum(-1)
        noise = slack * (fa_.abs().sum(-1) + gb_.abs().sum(-1))
        ok = vt >= value[active] - noise  # the first trial (the warm start) always passes
        rejected = active[~ok]
        if rejected.numel():
            radius[rejected] /= 4
        if not bool(ok.any()):
            active = active[radius[active] >= MIN_RADIUS]
            continue
        acc = active[ok]
        ft, trial, aa, bb, lb, vt, noise = (x[ok] for x in (ft, trial, aa, bb, lb, vt, noise))
        flat = vt <= value[acc] + noise  # F no higher beyond rounding
        g[acc], f[acc], value[acc] = trial, ft, vt
        radius[acc] = (radius[acc] * 2).clamp_(max=MAX_RADIUS)
        # the plan's rows divided by their mass, R = diag(1/a) P: each row sums to 1
        conditional = neg_cost(acc)
        conditional += (ft / eps)[:, :, None]
        conditional += (trial / eps + lb)[:, None, :]
        conditional.exp_()  # −inf (a zero mass in b) → 0
        plan = conditional * aa[:, :, None]
        c = plan.sum(1)
        residual = bb - c
        e = residual.abs().sum(-1)
        idle[acc] = torch.where(flat & (e >= err[acc]), idle[acc] + 1, 0)
        err[acc] = e
        go = (e > tol) & (idle[acc] < STALL)
        if bool(go.any()):
            if not bool(go.all()):
                acc, conditional, plan, c, residual = (x[go] for x in (acc, conditional, plan, c, residual))
            hessian = torch.bmm(plan.transpose(1, 2), conditional).neg_()  # Pᵀ diag(1/a) P, no 1/a
            hessian.diagonal(dim1=1, dim2=2).add_(c * (1 + DAMPING) + tiny)
            step[acc] = torch.linalg.solve(hessian, residual.unsqueeze(-1)).squeeze(-1).nan_to_num_(0.0)
        keep = torch.ones(r, dtype=torch.bool, device=g.device)
        keep[active[ok][~go]] = False  # converged or stalled
        keep &= radius >= MIN_RADIUS  # stalled
        active = active[keep[active]]
    return f, g, err, evaluations
