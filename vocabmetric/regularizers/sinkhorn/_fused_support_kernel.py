"""The Triton program of the fused support-mode solver (see :mod:`._fused_support`, which
imports this module only when it runs the solver: Triton is optional, and it decides at its
first import whether it runs interpreted). One program per position; the helpers are
inlined into it."""

import triton
import triton.language as tl


@triton.jit
def _transform(lw, lw_r, pot, pot_r, neg_cost, eps, cap):
    """``(T_w(φ) on the tokens (TOKENS,), T_w(φ)_r)``; ``neg_cost = −C/ε`` (TOKENS, TOKENS)."""
    col = lw + pot / eps  # (TOKENS,), −inf where a token carries no mass
    x = neg_cost + col[None, :]
    extra = lw_r + pot_r / eps - cap / eps  # the rest bin's term in every token's row
    top = tl.maximum(tl.max(x, 1), extra)
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(x - ref[:, None]), 1) + tl.exp(extra - ref)
    out = -eps * (ref + tl.log(total))
    # the rest bin's row: every token at cost cap, itself at 0
    y = col - cap / eps
    own = lw_r + pot_r / eps
    top_r = tl.maximum(tl.max(y, 0), own)
    ref_r = tl.where(top_r == float("-inf"), 0.0, top_r)
    total_r = tl.sum(tl.exp(y - ref_r), 0) + tl.exp(own - ref_r)
    return out, -eps * (ref_r + tl.log(total_r))

@triton.jit
def _error(w, w_r, old, old_r, new, new_r, eps):
    """L1 marginal error ``Σ_j w_j |e^{(old_j − new_j)/ε} − 1|`` (the rest bin included)."""
    ratio = tl.exp(tl.minimum(tl.maximum((old - new) / eps, -80.0), 50.0)) - 1.0
    ratio_r = tl.exp(tl.minimum(tl.maximum((old_r - new_r) / eps, -80.0), 50.0)) - 1.0
    return tl.sum(w * tl.abs(ratio), 0) + w_r * tl.abs(ratio_r)

@triton.jit
def _symmetric(w, w_r, lw, lw_r, neg_cost, eps, eps_ptr, n_eps, cap, tol, max_iter):
    """OT_ε(w, w)'s potential: ε-annealed averaged updates, then to ``tol`` at the target
    ``eps``. ``neg_cost = −C/eps`` is the only (TOKENS, TOKENS) tile kept: an earlier ε's is
    it times eps/ε."""
    pot = w * 0.0
    pot_r = w_r * 0.0
    for k in range(0, n_eps - 1):
        eps_k = tl.load(eps_ptr + k).to(pot.dtype)
        t, t_r = _transform(lw, lw_r, pot, pot_r, neg_cost * (eps / eps_k), eps_k, cap)
        pot = 0.5 * (pot + t)
        pot_r = 0.5 * (pot_r + t_r)
    err = tol + 1.0
    it = 0
    while (it < max_iter) & (err > tol):
        t, t_r = _transform(lw, lw_r, pot, pot_r, neg_cost, eps, cap)
        err = _error(w, w_r, pot, pot_r, t, t_r, eps)
        pot = 0.5 * (pot + t)
        pot_r = 0.5 * (pot_r + t_r)
        it += 1
    return pot, pot_r, err, it + n_eps - 1

@triton.jit
def solve_positions(a_ptr, b_ptr, cost_ptr, eps_ptr, value_ptr, h_ptr, err_ptr, iter_ptr,
           n_eps, tokens, cap, tol, max_iter, TOKENS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, TOKENS)
    real = i < tokens
    width = tokens + 1
    a = tl.load(a_ptr + row * width + i, mask=real, other=0.0)
    b = tl.load(b_ptr + row * width + i, mask=real, other=0.0)
    a_r = tl.load(a_ptr + row * width + tokens)
    b_r = tl.load(b_ptr + row * width + tokens)
    cap = a_r * 0.0 + cap  # in a's dtype (a float argument arrives as float32)
    tol = a_r * 0.0 + tol
    # padding tokens sit at cap from everything (finite potentials there, never NaN)
    cost = tl.load(cost_ptr + row * tokens * tokens + i[:, None] * tokens + i[None, :],
                   mask=real[:, None] & real[None, :], other=cap)
    cost = tl.where(i[:, None] == i[None, :], 0.0, cost)
    eps = tl.load(eps_ptr + n_eps - 1).to(a.dtype)
    neg_cost = -cost / eps
    la = tl.where(a > 0, tl.log(tl.where(a > 0, a, 1.0)), float("-inf"))
    lb = tl.where(b > 0, tl.log(tl.where(b > 0, b, 1.0)), float("-inf"))
    la_r = tl.where(a_r > 0, tl.log(tl.where(a_r > 0, a_r, 1.0)), float("-inf"))
    lb_r = tl.where(b_r > 0, tl.log(tl.where(b_r > 0, b_r, 1.0)), float("-inf"))
    fp, fp_r, err_p, it_p = _symmetric(a, a_r, la, la_r, neg_cost, eps, eps_ptr, n_eps, cap, tol, max_iter)
    gq, gq_r, err_q, it_q = _symmetric(b, b_r, lb, lb_r, neg_cost, eps, eps_ptr, n_eps, cap, tol, max_iter)
    same = (tl.max(tl.abs(a - b), 0) == 0) & (a_r == b_r)
    # the pair from OT(q, q)'s potential (OT(p, p)'s where p = q: the solution itself)
    g = tl.where(same, fp, gq)
    g_r = tl.where(same, fp_r, gq_r)
    f, f_r = _transform(lb, lb_r, g, g_r, neg_cost, eps, cap)
    f = tl.where(same, fp, f)
    f_r = tl.where(same, fp_r, f_r)
    g_new, g_new_r = _transform(la, la_r, f, f_r, neg_cost, eps, cap)
    g = tl.where(same, g, g_new)
    g_r = tl.where(same, g_r, g_new_r)
    err = tl.where(same, 0.0, tol + 1.0)
    it = 1
    while (it < max_iter) & (err > tol):
        fn, fn_r = _transform(lb, lb_r, g, g_r, neg_cost, eps, cap)
        err = _error(a, a_r, f, f_r, fn, fn_r, eps)
        g, g_r = _transform(la, la_r, fn, fn_r, neg_cost, eps, cap)
        f = fn
        f_r = fn_r
        it += 1
    gq = tl.where(same, fp, gq)
    gq_r = tl.where(same, fp_r, gq_r)
    # ⟨p, f − f_pp⟩ + ⟨q, g − g_qq⟩: exactly 0 where p = q (f = f_pp, g = g_qq)
    value = tl.sum(a * (f - fp), 0) + a_r * (f_r - fp_r) + tl.sum(b * (g - gq), 0) + b_r * (g_r - gq_r)
    keep = value > 0
    h = tl.where(keep, f - fp, 0.0)
    h_r = tl.where(keep, f_r - fp_r, 0.0)
    tl.store(value_ptr + row, tl.where(keep, value, 0.0))
    tl.store(h_ptr + row * width + i, h, mask=real)
    tl.store(h_ptr + row * width + tokens, h_r)
    tl.store(err_ptr + row, tl.maximum(err, tl.maximum(err_p, err_q)))
    tl.store(iter_ptr + row, (it + it_p + it_q).to(tl.int32))
