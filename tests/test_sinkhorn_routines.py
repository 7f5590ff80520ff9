"""The Sinkhorn package's shape: a routine per mode behind SinkhornDivergence (each checking
its own arguments), solvers whose settings a solve never changes (a fall-back hands off to a
new solver), a frozen loop state, and acceleration strategies passed in as objects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vocabmetric import CostOperator, VocabMetricError
from vocabmetric.regularizers.sinkhorn import SinkhornDivergence, SparseLogKernel, eps_schedule
from vocabmetric.regularizers.sinkhorn import _acceleration, _full, _routines, _solver, _state

EPS = 1 / 15


def point_cloud_operator(vocab_size=120, k=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(vocab_size, 5))
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return CostOperator.from_dense(dist / dist.max(), k=k, cap=1.0).symmetrized()


def peaked_pair(vocab_size, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab_size, generator=g, dtype=torch.float64) * 2
    z.scatter_add_(1, torch.randint(0, vocab_size, (n, 4), generator=g), torch.full((n, 4), 10.0, dtype=z.dtype))
    return z, z + 0.5 * torch.randn(n, vocab_size, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def op():
    return point_cloud_operator()


@pytest.mark.parametrize("kw, match", [
    (dict(support=8, warm_start=True), "warm_start=True keeps full-vocabulary potentials"),
    (dict(support=8, relaxation=1.2), "relaxation=1.2 is read by acceleration='overrelax'"),
    (dict(support=8, acceleration="overrelax"), "acceleration='overrelax' is for the full vocabulary"),
    (dict(embeddings=np.zeros((120, 3))), "embeddings= give support mode"),
    (dict(support=8, embeddings=np.zeros((7, 3))), "embeddings have 7 rows, the operator 120"),
    (dict(relaxation=0.0), "relaxation must be in"),
])
def test_each_mode_rejects_the_arguments_only_another_mode_reads(op, kw, match):
    with pytest.raises(VocabMetricError, match=match):
        SinkhornDivergence(op, **kw)


def test_each_mode_accepts_its_own_arguments(op):
    full = SinkhornDivergence(op, warm_start=True, acceleration="overrelax", relaxation=1.2)
    assert (full.mode, full.relaxation, full.warm_start) == ("full", 1.2, True)
    assert SinkhornDivergence(op).relaxation == 1.5  # the default ω where over-relaxation runs
    support = SinkhornDivergence(op, support=8, embeddings=np.zeros((120, 3)), acceleration="none")
    assert support.mode == "support" and support.embeddings.shape == (120, 3)


class EchoRoutine(_routines.SupportRoutine):
    """A support-fused stand-in that applies where told (a real routine class: the slot's
    interface is the support routine's)."""

    where = True

    @classmethod
    def applies(cls, module, device) -> bool:
        return cls.where


def test_the_support_fused_routine_is_taken_where_it_applies(op, monkeypatch):
    reg = SinkhornDivergence(op, support=8)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _routines.routine_for(reg, cpu) is _routines.SupportRoutine  # auto: the fused solver is for CUDA
    assert _routines.routine_for(SinkhornDivergence(op, support=8, backend="torch"), cuda) is _routines.SupportRoutine
    monkeypatch.setitem(_routines.ROUTINES, "support-fused", EchoRoutine)
    assert _routines.routine_for(reg, cuda) is EchoRoutine
    assert _routines.routine_for(SinkhornDivergence(op), cuda) is _routines.FullRoutine
    monkeypatch.setattr(EchoRoutine, "where", False)
    assert _routines.routine_for(reg, cuda) is _routines.SupportRoutine


def test_the_state_is_frozen_and_set_returns_a_new_one():
    state = _state.State(f=torch.zeros(2), error=torch.tensor([1.0, 2.0]), iterations=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.iterations = 4
    later = state.set(iterations=4).measured(torch.tensor([1]), torch.tensor([0.5]))
    assert (state.iterations, later.iterations) == (3, 4)
    assert state.error.tolist() == [1.0, 2.0] and later.error.tolist() == [1.0, 0.5]
    assert later.max_error == 1.0


def full_chunk(op, z, r, solver):
    kernel = solver.geometry
    order, _ = kernel.permutation
    p, q = (torch.softmax(x, -1).index_select(1, order).t().contiguous() for x in (z, r))
    return _solver.solve_chunk(solver, p, q, debias=True)


@pytest.mark.parametrize("scaled", [True, False])
def test_a_fall_back_hands_off_and_leaves_the_solver_as_built(op, monkeypatch, scaled):
    # a zero stall budget abandons the heavy block at its first check (tol far below reach)
    monkeypatch.setattr(_acceleration, "STALL_CHECKS", 0)
    monkeypatch.setattr(_full, "scaling_applies", lambda kernel, eps: scaled)
    kernel = SparseLogKernel(op, "cpu", torch.float64)
    eps_list = eps_schedule(EPS, op.cap, 0.5)
    solver = _full.full_solver(kernel, eps_list, 3000, 1e-13, acceleration="newton")
    assert type(solver).__name__ == ("ScalingSolver" if scaled else "Solver")
    before = {k: v for k, v in vars(solver).items() if isinstance(v, (int, float, str, list))}
    strategy = solver.acceleration
    z, r = peaked_pair(op.vocab_size)
    value, _, info = full_chunk(op, z, r, solver)
    assert "acceleration='newton' stopped decreasing the error" in info["fell_back"]
    assert info["marginal_error"] <= 1e-13 and torch.isfinite(value).all()
    after = {k: v for k, v in vars(solver).items() if isinstance(v, (int, float, str, list))}
    assert after == before and solver.acceleration is strategy
    # the plain solver from the same start reaches the same fixed point
    plain = _solver.Solver(kernel, eps_list, 3000, 1e-13, pos=1, check_every=2)
    torch.testing.assert_close(value, full_chunk(op, z, r, plain)[0], rtol=1e-9, atol=1e-12)


def test_a_strategy_object_is_passed_in_and_the_unrelaxed_watched_loop_is_the_plain_one(op):
    # OverRelaxation(ω = 1) runs the watched loop with no block and no relaxation: the plain
    # updates, so the same potentials bit for bit and the same iterations
    kernel = SparseLogKernel(op, "cpu", torch.float64)
    eps_list = eps_schedule(EPS, op.cap, 0.5)
    z, r = peaked_pair(op.vocab_size, seed=2)
    out = []
    for strategy in (_acceleration.PLAIN, _acceleration.OverRelaxation(1.0)):
        solver = _solver.Solver(kernel, eps_list, 3000, 1e-9, pos=1, check_every=2, acceleration=strategy)
        out.append(full_chunk(op, z, r, solver))
    (v0, h0, i0), (v1, h1, i1) = out
    assert torch.equal(v0, v1) and torch.equal(h0, h1)
    assert i0["iterations"] == i1["iterations"] and i1["fell_back"] is None


def test_the_public_acceleration_keyword_maps_to_strategy_objects():
    assert isinstance(_acceleration.full_acceleration("auto", 1.5), _acceleration.HeavyBlockNewton)
    assert isinstance(_acceleration.full_acceleration("newton", 1.5), _acceleration.HeavyBlockNewton)
    relaxed = _acceleration.full_acceleration("overrelax", 1.7)
    assert isinstance(relaxed, _acceleration.OverRelaxation) and relaxed.omega == 1.7
    assert _acceleration.full_acceleration("none", 1.5) is _acceleration.PLAIN
    assert relaxed.describe() == "acceleration='overrelax' (relaxation=1.7)"


def test_both_kernels_keep_the_geometry_protocol(op):
    from vocabmetric.regularizers.sinkhorn import DenseLogKernel
    from vocabmetric.regularizers.sinkhorn._geometry import DenseGeometry, SparseGeometry

    sparse = SparseLogKernel(op, "cpu", torch.float64)
    dense = DenseLogKernel(torch.rand(2, 5, 5, dtype=torch.float64))
    assert isinstance(sparse, SparseGeometry) and not isinstance(sparse, DenseGeometry)
    assert isinstance(dense, DenseGeometry) and not isinstance(dense, SparseGeometry)


def test_symmetrize_mutual_solves_on_the_mutual_pairs():
    rng = np.random.default_rng(3)
    V, k = 60, 6
    indices = np.stack([rng.choice(np.delete(np.arange(V), i), k, replace=False) for i in range(V)])
    asym = CostOperator(indices, np.sort(rng.uniform(0.1, 0.9, (V, k)), axis=1).astype(np.float32), cap=1.0)
    assert not asym.is_symmetric
    reg = SinkhornDivergence(asym, support=8, symmetrize="mutual")
    assert reg.op.is_symmetric and reg.op.k <= k
    np.testing.assert_array_equal(reg.op.indices, asym.mutual().indices)
    z, r = torch.randn(3, V, dtype=torch.float64), torch.randn(3, V, dtype=torch.float64)
    assert torch.isfinite(reg(z, r)).all()
    with pytest.raises(VocabMetricError, match="symmetrize"):
        SinkhornDivergence(asym, symmetrize="both")
