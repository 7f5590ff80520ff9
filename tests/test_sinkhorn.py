"""SinkhornDivergence: values against POT's dense log-domain Sinkhorn, debiasing, support
mode, envelope gradients against finite differences, stability, and the point of it all —
moving mass to a neighbour costs less than moving it far, which KL cannot see."""

from __future__ import annotations

import logging

import numpy as np
import ot
import pytest
import torch

from vocabmetric import CostOperator, VocabMetricError
from vocabmetric.errors import FingerprintMismatch
from vocabmetric.regularizers import full_kl
from vocabmetric.regularizers.sinkhorn import SinkhornDivergence

CAP = 1.0


def point_cloud_operator(vocab_size=200, k=12, seed=0, symmetric=True):
    """kNN truncation of a Euclidean cost between random points, cap = 1 (the max cost)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(vocab_size, 6))
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    op = CostOperator.from_dense(dist / dist.max(), k=k, cap=CAP)
    return op.symmetrized() if symmetric else op


def ot_eps(a, b, cost, eps):
    """OT_ε(a, b) = ⟨P, C⟩ + ε·KL(P ‖ a⊗b) at POT's converged log-domain plan."""
    plan = ot.sinkhorn(a, b, cost, reg=eps, method="sinkhorn_log", numItermax=200000, stopThr=1e-11)
    pos = plan > 0
    return float((plan * cost).sum() + eps * (plan[pos] * np.log(plan[pos] / np.outer(a, b)[pos])).sum())


def logits_pair(vocab_size, n=2, scale=2.0, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab_size, generator=gen, dtype=dtype) * scale
    r = torch.randn(n, vocab_size, generator=gen, dtype=dtype) * scale
    return z, r


@pytest.fixture(scope="module")
def op():
    return point_cloud_operator()


@pytest.mark.parametrize("eps", [0.5, 0.1, pytest.param(0.05, marks=pytest.mark.slow)])
def test_ot_value_matches_pot_dense(op, eps):
    z, r = logits_pair(op.vocab_size)
    reg = SinkhornDivergence(op, eps=eps, debias=False, max_iter=20000, tol=1e-11)
    got = reg(z, r)
    cost = op.dense().astype(np.float64)
    p, q = torch.softmax(z, -1).numpy(), torch.softmax(r, -1).numpy()
    want = np.array([ot_eps(p[i], q[i], cost, eps) for i in range(len(p))])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    assert reg.last_info["marginal_error"] <= 1e-11


@pytest.mark.parametrize("eps", [0.2, pytest.param(0.05, marks=pytest.mark.slow)])
def test_debiased_value_is_pots_three_term_composition(op, eps):
    z, r = logits_pair(op.vocab_size, seed=3)
    got = SinkhornDivergence(op, eps=eps, max_iter=20000, tol=1e-11)(z, r)
    cost = op.dense().astype(np.float64)
    p, q = torch.softmax(z, -1).numpy(), torch.softmax(r, -1).numpy()
    want = [ot_eps(a, b, cost, eps) - ot_eps(a, a, cost, eps) / 2 - ot_eps(b, b, cost, eps) / 2 for a, b in zip(p, q)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    assert np.all(got.numpy() > 0)


def test_zero_value_and_zero_gradient_at_p_equals_q(op):
    z, _ = logits_pair(op.vocab_size, n=3, seed=4)
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        logits = z.to(dtype).requires_grad_()
        for support in (None, 16):
            value = SinkhornDivergence(op, eps=0.05, support=support, tol=1e-9 if dtype == torch.float64 else 1e-6)(
                logits, z.to(dtype)
            )
            (grad,) = torch.autograd.grad(value.sum(), logits)
            assert value.abs().max() <= atol, (dtype, support)
            assert grad.abs().max() <= atol, (dtype, support)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_peaked_policy_equal_to_its_reference_gets_no_push_and_values_stay_non_negative(dtype):
    """Issue 16 item 13: p = q on peaked inputs gives 0 (float32 gradient was 1e-4); S ≥ 0 (clamped)."""
    gen, op = torch.Generator().manual_seed(0), point_cloud_operator(1000, k=12)
    z = torch.randn(8, 1000, generator=gen, dtype=torch.float64) * 2
    z.scatter_add_(1, torch.randint(0, 1000, (8, 8), generator=gen), 12 + 4 * torch.rand(8, 8, generator=gen).double())
    z, noise = z.to(dtype), torch.randn(2, 8, 1000, generator=gen).to(dtype)
    refs = torch.cat([z, z + 1e-6 * noise[0], z + 0.5 * noise[1]])  # equal, a hair away, near
    for support in (16, 64, None):
        logits = torch.cat([z, z, z]).requires_grad_()
        value = SinkhornDivergence(op, eps=CAP / 15, support=support)(logits, refs)
        (grad,) = torch.autograd.grad(value.sum(), logits)
        assert torch.all(value[:8] == 0) and torch.all(value >= 0) and torch.all(value[16:] > 0), (support, value)
        assert grad[:8].abs().max() <= (1e-7 if dtype == torch.float64 else 1e-6), (support, grad.abs().max())
        assert torch.all(grad[value == 0] == 0)


@pytest.mark.parametrize("support", [None, 12])
@pytest.mark.parametrize("debias", [True, False])
def test_gradient_matches_finite_differences(op, support, debias):
    z, r = logits_pair(op.vocab_size, n=1, seed=5)
    reg = SinkhornDivergence(op, eps=0.1, support=support, debias=debias, max_iter=20000, tol=1e-12)
    logits = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reg(logits, r).sum(), logits)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        direction = torch.randn(z.shape, generator=gen, dtype=z.dtype)
        h = 1e-5
        fd = (reg(z + h * direction, r).sum() - reg(z - h * direction, r).sum()) / (2 * h)
        assert float((grad * direction).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_support_mode_close_to_full_mode_on_peaked_distributions(op):
    # peaked like a language model's next-token distribution: a few tokens carry the mass
    z, r = logits_pair(op.vocab_size, n=4, scale=6.0, seed=7)
    full = SinkhornDivergence(op, eps=0.05, max_iter=5000, tol=1e-10)(z, r)
    for m, bound in ((16, 2e-2), (64, 1e-4)):
        sup = SinkhornDivergence(op, eps=0.05, support=m, max_iter=5000, tol=1e-10)(z, r)
        p, q = torch.softmax(z, -1), torch.softmax(r, -1)
        rest = p.topk(m).values.sum(-1).neg().add(1) + q.topk(m).values.sum(-1).neg().add(1)
        gap = (sup - full).abs()
        # the rest bin only moves the mass outside the support: the gap is of that order
        assert torch.all(gap <= CAP * rest + 1e-8), (m, gap, rest)
        assert torch.all(gap <= bound * full), (m, gap / full)


@pytest.mark.parametrize("eps", [CAP / 15, CAP / 50])
def test_support_mode_converges_where_alternating_updates_crawl(op, eps):
    # peaked p and q on the same few tokens with other weights (the RL case): at small ε
    # alternating Sinkhorn updates need hundreds to thousands of iterations here, the
    # support mode's Newton solver a few dozen; with every token of mass inside the
    # support (no rest mass) it is the exact OT_ε, POT's value
    gen = torch.Generator().manual_seed(12)
    V, n = op.vocab_size, 3
    tokens = torch.stack([torch.randperm(V, generator=gen)[:12] for _ in range(n)])
    z = torch.full((n, V), float("-inf"), dtype=torch.float64)
    r = z.clone()
    z.scatter_(1, tokens[:, :10], 3 * torch.randn(n, 10, generator=gen, dtype=torch.float64))
    r.scatter_(1, tokens[:, 2:], 3 * torch.randn(n, 10, generator=gen, dtype=torch.float64))
    reg = SinkhornDivergence(op, eps=eps, support=16, debias=False, max_iter=60, tol=1e-9)
    got = reg(z, r).numpy()
    assert reg.last_info["marginal_error"] <= 1e-9, reg.last_info
    cost = op.dense().astype(np.float64)
    p, q = torch.softmax(z, -1).numpy(), torch.softmax(r, -1).numpy()
    # on the tokens of mass only: POT's log-domain solver takes no zeros
    want = [ot_eps(a[a > 0], b[b > 0], cost[np.ix_(a > 0, b > 0)], eps) for a, b in zip(p, q)]
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_support_mode_newton_and_alternating_updates_agree(op, monkeypatch):
    # large supports (over NEWTON_MAX_POINTS) take alternating updates: both solvers reach
    # the same potentials, so the same value and gradient, on a moderate ε
    import vocabmetric.regularizers.sinkhorn._support as support_mode

    z, r = logits_pair(op.vocab_size, n=3, scale=3.0, seed=13)
    results = []
    for limit in (support_mode.NEWTON_MAX_POINTS, 0):
        monkeypatch.setattr(support_mode, "NEWTON_MAX_POINTS", limit)
        logits = z.clone().requires_grad_()
        reg = SinkhornDivergence(op, eps=0.2, support=12, max_iter=5000, tol=1e-11)
        value = reg(logits, r)
        (grad,) = torch.autograd.grad(value.sum(), logits)
        results.append((value.detach(), grad, reg.last_info["iterations"]))
    (v_newton, g_newton, it_newton), (v_alt, g_alt, it_alt) = results
    torch.testing.assert_close(v_newton, v_alt, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_newton, g_alt, rtol=1e-7, atol=1e-10)
    assert it_newton < it_alt


def test_finite_for_exact_zeros_and_huge_logits_at_small_eps(op):
    V = op.vocab_size
    z = torch.zeros(3, V)
    z[0, : V // 2] = float("-inf")  # exact zeros in p
    z[1] = torch.linspace(-1e4, 1e4, V)  # ±1e4: one token takes everything
    z[2, 5] = 1e4
    r = torch.zeros(3, V)
    r[0, V // 3 :] = float("-inf")  # exact zeros in q, partly where p is zero too
    r[1, 7] = -1e4
    r[2] = torch.linspace(1e4, -1e4, V)
    for support in (None, 8):
        logits = z.clone().requires_grad_()
        reg = SinkhornDivergence(op, eps=0.01 * CAP, support=support, max_iter=500)
        value = reg(logits, r)
        (grad,) = torch.autograd.grad(value.sum(), logits)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), support
        assert torch.all(value >= -1e-4)
        # float32 agrees with float64 on the same inputs
        ref64 = SinkhornDivergence(op, eps=0.01 * CAP, support=support, max_iter=500)(z.double(), r.double())
        np.testing.assert_allclose(value.detach().double().numpy(), ref64.numpy(), rtol=1e-2, atol=1e-5)  # ε = 0.01·cap, 500 iterations


def test_top_k_reference_equals_the_distribution_it_describes(op):
    V = op.vocab_size
    z, r = logits_pair(V, n=2, seed=8)
    logq = torch.log_softmax(r, -1)
    top = logq.topk(10)
    # what the top-k pair means: its probabilities, and the rest spread evenly
    q = torch.full_like(logq, 0.0)
    rest = (1 - top.values.exp().sum(-1, keepdim=True)) / (V - 10)
    q += rest
    q.scatter_(-1, top.indices, top.values.exp())
    reg = SinkhornDivergence(op, eps=0.1, tol=1e-10, max_iter=5000)
    got = reg(z, (top.indices, top.values))
    want = reg(z, q.log())
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9)


def test_asymmetric_operator_is_symmetrized_and_says_so(caplog):
    asym = point_cloud_operator(vocab_size=120, k=5, seed=9, symmetric=False)
    assert not asym.is_symmetric
    z, r = logits_pair(120, seed=10)
    with caplog.at_level(logging.INFO, logger="vocabmetric.regularizers.sinkhorn"):
        reg = SinkhornDivergence(asym, eps=0.1, tol=1e-11, max_iter=5000)
    assert "symmetrizing" in caplog.text
    assert reg.op.is_symmetric
    same = SinkhornDivergence(asym.symmetrized(), eps=0.1, tol=1e-11, max_iter=5000)
    np.testing.assert_allclose(reg(z, r).numpy(), same(z, r).numpy(), rtol=1e-10)
    with pytest.raises(VocabMetricError, match="not symmetric"):
        SinkhornDivergence(asym, symmetrize=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_cpu_kernel_equals_the_gathered_torch_path(dtype):
    """Numba and the gathered torch path agree (-inf weights, rows of uneven degree)."""
    from vocabmetric.regularizers.sinkhorn._kernel import SparseLogKernel, numba_sparse_lse

    if numba_sparse_lse() is None:
        pytest.skip("numba is not installed")
    kernel = SparseLogKernel(point_cloud_operator(300, k=9, symmetric=False).symmetrized(), "cpu", dtype)
    assert len(kernel.buckets) > 1
    h = torch.randn(5, 300, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 4
    h[0, :40] = float("-inf")
    h[1] = float("-inf")
    h[2] *= 40  # most neighbourhoods e^-100 or more below the row's max: the fused sum underflows
    h = h.t().contiguous()  # token-major, as the solver calls the kernel
    for eps in (0.5, 0.05, CAP / 90):  # at cap/ε = 90 the dense term is below float32's range too
        fused, gathered = kernel.fused(h, eps), kernel.gathered(h, eps)
        assert torch.equal(torch.isneginf(fused), torch.isneginf(gathered))
        finite = torch.isfinite(gathered)
        torch.testing.assert_close(fused[finite], gathered[finite], rtol=1e-12 if dtype == torch.float64 else 1e-5,
                                   atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_support_kernel_equals_the_log_domain_sum(dtype):
    """The support kernel equals logsumexp(h − C/ε): one problem, stacked copies, subsets, ε = cap/90."""
    from vocabmetric.regularizers.sinkhorn._support import DenseLogKernel

    gen = torch.Generator().manual_seed(5)
    r, s = 4, 9
    x = torch.rand(r, s, 3, generator=gen, dtype=torch.float64)
    cost = torch.cdist(x, x).clamp(max=CAP)  # symmetric, 0 on the diagonal
    kernel = DenseLogKernel(cost.to(dtype))
    h = torch.randn(2 * r, s, generator=gen, dtype=torch.float64) * 3
    h[0, :4] = float("-inf")
    h[5] *= 60  # most terms e^-100 or more below the largest
    for eps in (0.5, 0.05, CAP / 90):
        for rows in (None, torch.arange(r).repeat(2), torch.tensor([3, 0, 0, 2, 1, 3, 2, 1])):
            source = torch.arange(r).repeat(2) if rows is None else rows
            want = torch.logsumexp(h[:, None, :] - cost[source] / eps, -1)
            got = kernel(h.to(dtype), eps, rows)
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_chunks_give_the_same_values_and_gradients_as_one_solve(op):
    """Chunks of 3, 3, 1 positions match one solve of all 7 (value, gradient), and a second call."""
    z, r = logits_pair(200, n=7, scale=3.0)
    results = []
    for chunk_size in (3, None, None):
        reg = SinkhornDivergence(op, eps=0.1, tol=1e-9, max_iter=2000, chunk_size=chunk_size)
        zz = z.clone().requires_grad_()
        value = reg(zz, r)
        value.sum().backward()
        results.append((value.detach(), zz.grad))
        assert reg.last_info["chunks"] == (3 if chunk_size else 1)
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-7, atol=1e-12)


def test_positions_that_finish_early_leave_the_others_untouched(op):
    """Positions done early (p = q, fast, slow) get what they get alone: the pool hands back only the dead."""
    z, r = logits_pair(200, n=4, scale=3.0, seed=5)
    r[0] = z[0]  # converges at the first check
    r[1] = z[1] + 0.01 * torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=z.dtype)
    values, grads = [], []
    for chunk_size in (None, 1):
        reg = SinkhornDivergence(op, eps=0.05, tol=1e-9, max_iter=5000, chunk_size=chunk_size)
        zz = z.clone().requires_grad_()
        value = reg(zz, r)
        value.sum().backward()
        values.append(value.detach())
        grads.append(zz.grad)
    assert abs(values[0][0]) < 1e-12 and values[0][1:].min() > 1e-6
    torch.testing.assert_close(values[0], values[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-12)


def test_stopping_far_from_tol_is_said_once_and_converging_is_silent(op, caplog):
    z, r = logits_pair(200, n=3, scale=4.0)
    with caplog.at_level(logging.WARNING, logger="vocabmetric"):
        short = SinkhornDivergence(op, eps=0.05, max_iter=2, eps_scaling=0)
        short(z, r)
        short(z, r)
    assert short.last_info["marginal_error"] > 1e-3
    assert caplog.text.count("max_iter=2 stopped positions at an L1 marginal error") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vocabmetric"):
        done = SinkhornDivergence(op, eps=0.05, max_iter=5000, tol=1e-8)
        done(z, r)
    assert done.last_info["marginal_error"] <= 1e-8 and "marginal error" not in caplog.text


def test_chunks_and_leading_dims_do_not_change_the_result(op):
    z, r = logits_pair(op.vocab_size, n=6, seed=11)
    whole = SinkhornDivergence(op, eps=0.3, tol=1e-10, max_iter=5000)(z, r)
    chunked = SinkhornDivergence(op, eps=0.3, tol=1e-10, max_iter=5000, chunk_size=4)(
        z.view(2, 3, -1), r.view(2, 3, -1)
    )
    assert chunked.shape == (2, 3)
    np.testing.assert_allclose(chunked.reshape(-1).numpy(), whole.numpy(), rtol=1e-8)


def test_bad_inputs_name_the_regularizer(op):
    reg = SinkhornDivergence(op)
    z, r = logits_pair(op.vocab_size, dtype=torch.float32)
    bad = z.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(VocabMetricError, match="SinkhornDivergence.*NaN"):
        reg(bad, r)
    with pytest.raises(VocabMetricError, match="SinkhornDivergence.*reference logits.*NaN"):
        reg(z, bad)
    bad[0, 3] = float("inf")
    with pytest.raises(VocabMetricError, match="SinkhornDivergence: policy logits contains \\+inf"):
        reg(bad, r)
    empty = z.clone()
    empty[1] = float("-inf")
    with pytest.raises(VocabMetricError, match="SinkhornDivergence: policy logits row 1 .* all -inf"):
        reg(empty, r)
    with pytest.raises(FingerprintMismatch, match="SinkhornDivergence.*199"):
        reg(z[:, :-1], r[:, :-1])
    fp_op = CostOperator(op.indices, op.costs, op.cap, fingerprint="a" * 64)
    with pytest.raises(FingerprintMismatch, match="SinkhornDivergence"):
        SinkhornDivergence(fp_op)(z, r, fingerprint="b" * 64)
    with pytest.raises(VocabMetricError, match="eps"):
        SinkhornDivergence(op, eps=0.0)
    with pytest.raises(VocabMetricError, match="support"):
        SinkhornDivergence(op, support=0)


def test_neighbour_move_costs_less_than_far_move_on_a_real_store(small_store):
    reg = SinkhornDivergence.from_store(small_store, "knn", eps=0.05, tol=1e-6, max_iter=300)
    assert reg.op.is_symmetric and reg.vocab_size == small_store.vocab_size
    knn = small_store.operator("knn")
    V = knn.vocab_size
    trained = np.flatnonzero(small_store.trained)
    a = int(trained[len(trained) // 2])
    near_ids, near_costs = knn.neighbors(a)
    near = int(near_ids[0])
    far = int(np.argmax(knn.cost(np.full(V, a), np.arange(V))))
    assert knn.cost(a, far) > near_costs[0]
    ref = torch.zeros(V)
    ref[a] = 8.0  # the reference is confident in a; b and the far token look alike to KL
    moved = {}
    for name, target in (("near", near), ("far", far)):
        logits = ref.clone()
        logits[target] = 8.0  # half of a's mass now sits on the target
        moved[name] = logits
    z = torch.stack([moved["near"], moved["far"]])
    refs = ref.expand(2, V)
    kl = full_kl(z, refs)
    assert float(kl[0]) == pytest.approx(float(kl[1]), rel=1e-5)  # KL cannot tell them apart
    for mode in (reg, SinkhornDivergence.from_store(small_store, "knn", eps=0.05, support=32)):
        value = mode(z, refs)
        assert value[0] < 0.8 * value[1], (mode.support, value)
        assert value[0] > 0


def test_locality_order_puts_a_shuffled_chain_of_neighbours_back_together():
    """The token order (RCM) is a permutation that brings a shuffled chain's neighbours back together."""
    from vocabmetric.regularizers.sinkhorn._kernel import SparseLogKernel, locality_order

    V, rng = 2000, np.random.default_rng(0)
    ids = rng.permutation(V)  # token at chain position t
    chain = (np.arange(V)[:, None] + np.array([-2, -1, 1, 2])) % V  # ring neighbours by position
    index = np.empty((V, 4), dtype=np.int64)
    index[ids] = ids[chain]
    op = CostOperator(index, rng.uniform(0.1, 1.0, (V, 4)), cap=CAP).symmetrized()
    kernel = SparseLogKernel(op, "cpu", torch.float64)
    assert np.array_equal(np.sort(kernel.order), np.arange(V))
    assert np.array_equal(kernel.order[kernel.rank], np.arange(V))
    indptr, nbr, _ = kernel.csr
    rows = np.repeat(np.arange(V), np.diff(indptr))
    assert np.abs(nbr - rows).max() <= 8 < np.abs(ids[chain] - np.arange(V)[:, None]).mean()
    assert np.array_equal(nbr[indptr[:-1]], np.arange(V))  # each row's first entry is itself
    order = locality_order(indptr, nbr)
    assert np.array_equal(np.sort(order), np.arange(V))
