"""The accelerated full-vocabulary Sinkhorn: the same answer as the plain solver, in fewer
iterations where the plain one plateaus (a few heavy tokens on a capped kNN cost), warm
starts, and the fall-back of an acceleration that diverges."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vocabmetric import CostOperator, VocabMetricError
from vocabmetric.regularizers.sinkhorn import SinkhornDivergence

EPS = 1 / 15  # cap / 15, the ε


def point_cloud_operator(vocab_size=400, k=12, seed=0):
    """kNN truncation of a Euclidean cost between random points, cap = 1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(vocab_size, 6))
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return CostOperator.from_dense(dist / dist.max(), k=k, cap=1.0).symmetrized()


def heavy_pair(vocab_size, n=4, seed=0, drift=0.0):
    """Peaked logits (6 tokens far above a Gaussian background: most of the mass) and a
    reference near them; ``drift`` moves both by that much per logit (a training step)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab_size, generator=g, dtype=torch.float64) * 2
    z.scatter_add_(1, torch.randint(0, vocab_size, (n, 6), generator=g),
                   10 + 4 * torch.rand(n, 6, generator=g, dtype=torch.float64))
    r = z + 0.5 * torch.randn(n, vocab_size, generator=g, dtype=torch.float64)
    if drift:
        step = torch.Generator().manual_seed(seed + 100)
        z = z + drift * torch.randn(z.shape, generator=step, dtype=z.dtype)
        r = r + drift * torch.randn(r.shape, generator=step, dtype=r.dtype)
    return z, r


@pytest.fixture(scope="module")
def op():
    return point_cloud_operator()


def value_and_grad(reg, z, r):
    z = z.clone().requires_grad_()
    value = reg(z, r)
    value.sum().backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("debias", [True, False])
def test_newton_reaches_the_plain_solvers_value_and_gradient_in_fewer_iterations(op, debias):
    z, r = heavy_pair(op.vocab_size)
    plain = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=5000, acceleration="none", debias=debias)
    newton = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=5000, acceleration="newton", debias=debias)
    v0, g0 = value_and_grad(plain, z, r)
    v1, g1 = value_and_grad(newton, z, r)
    assert plain.last_info["marginal_error"] <= 1e-8 and newton.last_info["marginal_error"] <= 1e-8
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert newton.last_info["iterations"] * 5 < plain.last_info["iterations"]
    assert newton.last_info["fell_back"] is None


def test_newton_matches_pot_on_a_tiny_case():
    ot = pytest.importorskip("ot")
    small = point_cloud_operator(vocab_size=60, k=8, seed=2)
    z, r = heavy_pair(60, n=2, seed=3)
    got = SinkhornDivergence(small, eps=EPS, tol=1e-11, max_iter=20000, debias=False, acceleration="newton")(z, r)
    cost = small.dense().astype(np.float64)
    p, q = torch.softmax(z, -1).numpy(), torch.softmax(r, -1).numpy()
    want = []
    for a, b in zip(p, q):
        plan = ot.sinkhorn(a, b, cost, reg=EPS, method="sinkhorn_log", numItermax=200000, stopThr=1e-12)
        pos = plan > 0
        want.append((plan * cost).sum() + EPS * (plan[pos] * np.log(plan[pos] / np.outer(a, b)[pos])).sum())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_newton_converges_where_plain_updates_plateau(op):
    """Heavy tokens on a capped cost: the plain pair is still far from tol after 200
    iterations; the block-Newton pair meets it well within that."""
    z, r = heavy_pair(op.vocab_size, seed=0)
    plain = SinkhornDivergence(op, eps=EPS, tol=1e-6, max_iter=200, acceleration="none")
    newton = SinkhornDivergence(op, eps=EPS, tol=1e-6, max_iter=200, acceleration="auto")
    plain(z, r)
    newton(z, r)
    assert plain.last_info["marginal_error"] > 1e-5
    assert newton.last_info["marginal_error"] <= 1e-6
    assert newton.last_info["iterations"] <= 60


def test_warm_start_converges_in_fewer_iterations_to_the_same_answer(op, acceleration="newton"):
    """(Plain updates gain little from a warm start here: 231 iterations against 235; the
    slow heavy-token mode has to be crossed again whenever the heavy masses move.)"""
    z0, r0 = heavy_pair(op.vocab_size, seed=7)
    z1, r1 = heavy_pair(op.vocab_size, seed=7, drift=0.05)
    kw = dict(eps=EPS, tol=1e-8, max_iter=3000, acceleration=acceleration)
    warm = SinkhornDivergence(op, warm_start=True, **kw)
    cold = SinkhornDivergence(op, **kw)
    warm(z0, r0)
    assert warm.last_info["warm"] is False  # the first call has nothing to start from
    v_warm, g_warm = value_and_grad(warm, z1, r1)
    assert warm.last_info["warm"] is True
    v_cold, g_cold = value_and_grad(cold, z1, r1)
    assert warm.last_info["iterations"] < cold.last_info["iterations"]
    torch.testing.assert_close(v_warm, v_cold, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_warm, g_cold, rtol=1e-4, atol=1e-7)
    # another shape drops the cache: a cold start, and the right answer
    warm(z1[:2], r1[:2])
    assert warm.last_info["warm"] is False



def solve_both_domains(op, z, r, monkeypatch, tol):
    """Value, gradient and info of the newton solve in the scaling domain and the log
    domain (``scaling_applies`` forced), and how many scaling-domain sparse passes ran."""
    from vocabmetric.regularizers.sinkhorn import _full, _scaling

    passes = {"n": 0}
    apply = _scaling.LinearKernel.apply

    def counted(self, *a, **kw):
        passes["n"] += 1
        return apply(self, *a, **kw)

    monkeypatch.setattr(_scaling.LinearKernel, "apply", counted)
    out = {}
    for scaled in (True, False):
        monkeypatch.setattr(_full, "scaling_applies", lambda kernel, eps, s=scaled: s)
        passes["n"] = 0
        reg = SinkhornDivergence(op, eps=EPS, tol=tol, max_iter=3000, acceleration="newton")
        out[scaled] = (*value_and_grad(reg, z, r), reg.last_info, passes["n"])
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_the_scaling_domain_reaches_the_log_domains_value_and_gradient(op, monkeypatch, dtype, tol):
    z, r = heavy_pair(op.vocab_size, seed=3)
    out = solve_both_domains(op, z.to(dtype), r.to(dtype), monkeypatch, tol)
    (v1, g1, info1, passes1), (v0, g0, info0, passes0) = out[True], out[False]
    assert passes1 > 10 and passes0 == 0  # the scaling domain ran, and only where asked
    assert info1["marginal_error"] <= tol and info1["fell_back"] is None
    assert abs(info1["iterations"] - info0["iterations"]) <= 2  # the same iteration, other arithmetic
    # both within tol of the same fixed point (the gradient as the warm-start test allows)
    close = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(v1, v0, **close)
    torch.testing.assert_close(g1, g0, **close)


def test_sums_out_of_the_scaling_range_are_redone_in_the_log_domain(op, monkeypatch):
    from vocabmetric.regularizers.sinkhorn import _scaling

    z, r = heavy_pair(op.vocab_size, seed=4)
    reference = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=3000, acceleration="none")(z, r)
    monkeypatch.setitem(_scaling.SUM_RANGE, torch.float64, (1e300, 1e301))  # every sum "out of range"
    out = solve_both_domains(op, z, r, monkeypatch, 1e-8)
    v1, _, info1, passes1 = out[True]
    assert passes1 >= 2  # it tried: the symmetric problems and the pair each left at once
    assert info1["marginal_error"] <= 1e-8
    torch.testing.assert_close(v1, out[False][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v1, reference, rtol=1e-6, atol=1e-9)

def test_a_diverging_acceleration_falls_back_with_a_warning_naming_it(op, caplog):
    z, r = heavy_pair(op.vocab_size)
    reference = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=5000, acceleration="none")(z, r)
    reg = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=5000, acceleration="overrelax", relaxation=1.99)
    with caplog.at_level(logging.WARNING, logger="vocabmetric"):
        got = reg(z, r)
        reg(z, r)
    assert "acceleration='overrelax' (relaxation=1.99) diverged" in caplog.text
    assert caplog.text.count("fell back to plain Sinkhorn") == 1  # said once per instance
    assert reg.last_info["marginal_error"] <= 1e-8
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9)


def test_moderate_over_relaxation_converges_without_falling_back(op):
    z, r = heavy_pair(op.vocab_size, seed=9)
    plain = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=5000, acceleration="none")
    relaxed = SinkhornDivergence(op, eps=EPS, tol=1e-8, max_iter=5000, acceleration="overrelax", relaxation=1.5)
    torch.testing.assert_close(relaxed(z, r), plain(z, r), rtol=1e-6, atol=1e-9)
    assert relaxed.last_info["fell_back"] is None
    assert relaxed.last_info["iterations"] < plain.last_info["iterations"]


@pytest.mark.parametrize("kw, match", [
    (dict(acceleration="anderson3"), "acceleration must be one of"),
    (dict(relaxation=2.0), "relaxation must be in"),
])
def test_bad_acceleration_settings_are_named(op, kw, match):
    with pytest.raises(VocabMetricError, match=match):
        SinkhornDivergence(op, **kw)
