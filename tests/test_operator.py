"""CostOperator and TreeMetric: cost semantics, symmetrization, dense round trips, torch."""

from __future__ import annotations

import numpy as np
import pytest

from vocabmetric import CostOperator, TreeMetric, VocabMetricError
from vocabmetric.errors import FingerprintMismatch


def random_operator(vocab_size=40, k=5, seed=0, empty=0.2):
    """A random operator with distinct neighbours per row and some empty (-1) slots."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(np.delete(np.arange(vocab_size), i), k, replace=False) for i in range(vocab_size)])
    idx[rng.random(idx.shape) < empty] = -1
    costs = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
    return CostOperator(idx, costs, cap=1.5), idx, costs


def test_cost_semantics_diagonal_stored_empty_and_cap():
    op, idx, costs = random_operator()
    V = op.vocab_size
    ii, jj = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    got = op.cost(ii, jj)
    expected = np.full((V, V), 1.5, dtype=np.float32)
    for i in range(V):
        for m in range(idx.shape[1]):
            if idx[i, m] >= 0:
                expected[i, idx[i, m]] = costs[i, m]
    np.fill_diagonal(expected, 0)
    np.testing.assert_array_equal(got, expected)
    assert isinstance(op.cost(0, 0), float) and op.cost(0, 0) == 0.0
    # an empty slot carries the cap in the stored array, never a stale value
    assert np.all(op.costs[op.indices < 0] == 1.5)
    np.testing.assert_array_equal(op.dense(), expected)


def test_neighbors_sorted_and_without_empty_slots():
    op, idx, costs = random_operator(seed=1)
    for i in (0, 7, 39):
        ids, cs = op.neighbors(i)
        want = {int(j): float(c) for j, c in zip(idx[i], costs[i]) if j >= 0}
        assert dict(zip(ids.tolist(), cs.tolist())) == pytest.approx(want)
        assert np.all(np.diff(cs) >= 0)
    with pytest.raises(VocabMetricError, match="out of range"):
        op.neighbors(40)
    with pytest.raises(VocabMetricError, match="out of range"):
        op.cost(0, -1)


def test_symmetrized_is_union_with_min_cost():
    op, _, _ = random_operator(seed=2)
    assert not op.is_symmetric
    sym = op.symmetrized()
    assert sym.is_symmetric
    dense, sdense = op.dense(), sym.dense()
    stored = dense < op.cap
    expected = np.where(stored & stored.T, np.minimum(dense, dense.T),
                        np.where(stored, dense, np.where(stored.T, dense.T, op.cap)))
    np.fill_diagonal(expected, 0)
    np.testing.assert_array_equal(sdense, expected)
    # width = the largest union degree (out-neighbours plus in-neighbours)
    assert sym.k == int(((sdense < op.cap) & ~np.eye(op.vocab_size, dtype=bool)).sum(1).max())
    assert sym.symmetrized().is_symmetric
    np.testing.assert_array_equal(sym.symmetrized().dense(), sdense)


def test_invalid_operators_are_refused():
    idx = np.array([[1, -1], [0, 0]])
    with pytest.raises(VocabMetricError, match="row 1 lists the same neighbour twice"):
        CostOperator(idx, np.ones((2, 2)), 2.0)
    with pytest.raises(VocabMetricError, match="cap"):
        CostOperator(np.array([[1], [0]]), np.array([[3.0], [1.0]]), 2.0)
    with pytest.raises(VocabMetricError, match="out of range"):
        CostOperator(np.array([[5], [0]]), np.ones((2, 1)), 2.0)
    with pytest.raises(VocabMetricError, match="same shape"):
        CostOperator(np.zeros((3, 2), int), np.ones((3, 3)), 2.0)


def test_dense_refuses_large_vocabularies():
    op = CostOperator(np.full((20001, 1), -1), np.zeros((20001, 1)), 1.0)
    with pytest.raises(VocabMetricError, match=r"refuses V=20001.*cost\(i, j\)"):
        op.dense()


def test_from_dense_round_trip():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(25, 3))
    full = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    op = CostOperator.from_dense(full, k=24)
    np.testing.assert_allclose(op.dense(), full, rtol=1e-6, atol=1e-6)
    small = CostOperator.from_dense(full, k=4, cap=10.0)
    d = small.dense()
    for i in range(25):
        nearest = np.argsort(np.where(np.arange(25) == i, np.inf, full[i]))[:4]
        np.testing.assert_allclose(d[i, nearest], full[i, nearest], rtol=1e-6)
        assert (d[i] == 10.0).sum() == 25 - 1 - 4


def test_check_vocab_and_fingerprint():
    op = CostOperator(np.array([[1], [0]]), np.ones((2, 1)), 2.0, fingerprint="a" * 64)
    op.check_vocab(2, "a" * 64)
    with pytest.raises(FingerprintMismatch, match="2 token ids"):
        op.check_vocab(3)
    with pytest.raises(FingerprintMismatch, match="another tokenizer"):
        op.check_vocab(2, "b" * 64)


# -- TreeMetric -------------------------------------------------------------------------
def small_tree():
    #        6 (root)
    #      /   \
    #     4     5        weights: 4->6: 1, 5->6: 2
    #    / \   / \       0->4: .5, 1->4: .25, 2->5: 1, 3->5: 3
    #   0   1 2   3
    parent = np.array([4, 4, 5, 5, 6, 6, -1])
    weight = np.array([0.5, 0.25, 1.0, 3.0, 1.0, 2.0, 0.0])
    return TreeMetric(parent, weight, np.arange(4))


def test_tree_distance_by_hand():
    tree = small_tree()
    assert tree.distance(0, 1) == pytest.approx(0.75)
    assert tree.distance(0, 3) == pytest.approx(0.5 + 1 + 2 + 3)
    assert tree.distance(2, 2) == 0
    d = tree.dense()
    np.testing.assert_allclose(d, d.T)
    assert d[1, 2] == pytest.approx(0.25 + 1 + 2 + 1)
    with pytest.raises(VocabMetricError, match="out of range"):
        tree.distance(0, 4)


def test_tree_rejects_invalid_structures():
    with pytest.raises(VocabMetricError, match="exactly one root"):
        TreeMetric([-1, -1], [0, 0], [0, 1])
    with pytest.raises(VocabMetricError, match="cycle"):
        TreeMetric([-1, 2, 1], [0, 1, 1], [1, 2])
    with pytest.raises(VocabMetricError, match="weights"):
        TreeMetric([-1, 0], [0, -1], [1])




def test_mutual_keeps_the_pairs_both_tokens_list_symmetric_at_the_smaller_cost():
    """A hub listed by everyone keeps only its own neighbours (no row widens, unlike the
    union), the cost is symmetric, and a pair only one token lists costs the cap."""
    # token 0 is a hub: every token lists it; 0 lists 1 and 2
    indices = [[1, 2], [0, 2], [0, 1], [0, 2]]
    costs = [[0.1, 0.4], [0.2, 0.3], [0.5, 0.35], [0.6, 0.9]]
    op = CostOperator(indices, costs, cap=1.0, fingerprint="f")
    mutual = op.mutual()
    assert mutual.is_symmetric and mutual.fingerprint == "f" and mutual.k <= 2 < op.symmetrized().k
    assert mutual.cost(0, 1) == pytest.approx(0.1) == mutual.cost(1, 0)
    assert mutual.cost(0, 2) == pytest.approx(0.4) == mutual.cost(2, 0)
    assert mutual.cost(1, 2) == pytest.approx(0.3) == mutual.cost(2, 1)
    assert mutual.cost(3, 0) == 1.0 == mutual.cost(0, 3)  # 3 lists 0, 0 does not list 3: cap


def test_mutual_is_the_brute_force_mutual_pairs_on_a_random_operator():
    rng = np.random.default_rng(7)
    V, k = 40, 6
    indices = np.stack([rng.choice(np.delete(np.arange(V), i), k, replace=False) for i in range(V)])
    costs = np.sort(rng.uniform(0.1, 0.9, (V, k)), axis=1).astype(np.float32)
    op = CostOperator(indices, costs, cap=1.0)
    stored = {(i, int(j)): float(c) for i in range(V) for j, c in zip(indices[i], costs[i])}
    mutual = op.mutual()
    for i in range(V):
        for j in range(V):
            if i != j:
                want = min(stored[i, j], stored[j, i]) if (i, j) in stored and (j, i) in stored else 1.0
                assert mutual.cost(i, j) == pytest.approx(want)
