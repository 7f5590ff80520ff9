"""The fast paths behind `plot --kind costs` and Sinkhorn's load (issue 28, point 2): each
gives the values of the slow path it replaced, on the small real store and random operators.
Their speed is measured by benchmarks/newcomer_load.py, not here."""

from __future__ import annotations

import numpy as np
import pytest

from vocabmetric.cost import CostOperator, TreeMetric
from vocabmetric.regularizers import regularizer_from_store


def test_tree_distances_from_equal_the_pairwise_distance(small_store):
    tree = small_store.tree()
    rng = np.random.default_rng(0)
    everyone = np.arange(small_store.vocab_size)
    for i in rng.choice(np.flatnonzero(small_store.usable), 12, replace=False):
        np.testing.assert_array_equal(tree.distances_from(int(i)), tree.distance(int(i), everyone))
        for t in tree.trees:
            np.testing.assert_array_equal(t.distances_from(int(i)), t.distance(int(i), everyone))


def test_tree_distances_from_on_a_hand_made_tree():
    #        0
    #   1 (w 1)   2 (w 3)
    #  3 (w .5)   4 (w 2)
    tree = TreeMetric(parent=[-1, 0, 0, 1, 2], weight=[0, 1, 3, 0.5, 2], leaf_of_token=[3, 1, 4, 2, 3])
    np.testing.assert_allclose(tree.distances_from(0), [0, 0.5, 6.5, 4.5, 0])
    np.testing.assert_allclose(tree.distances_from(3), [4.5, 4, 2, 0, 4.5])


@pytest.mark.parametrize("metric", ["l2", "tree"])
def test_neighbors_on_demand_equal_a_full_scan(small_store, metric):
    rng = np.random.default_rng(1)
    usable = np.flatnonzero(small_store.usable)
    for i in rng.choice(usable, 15, replace=False):
        others = usable[usable != i]
        costs = small_store.pair_costs(int(i), others, metric)
        top = np.argsort(costs, kind="stable")[:16]
        got = small_store.neighbors(int(i), k=16, metric=metric)
        assert [n.id for n in got] == others[top].tolist()
        np.testing.assert_array_equal([n.cost for n in got], costs[top].astype(np.float64))


def _random_operator(vocab_size: int, k: int, seed: int, ties: bool = False) -> CostOperator:
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(np.delete(np.arange(vocab_size), i), k, replace=False) for i in range(vocab_size)])
    costs = rng.integers(1, 5, (vocab_size, k)) / 4 if ties else rng.uniform(0.1, 1.0, (vocab_size, k))
    idx[::7, -1] = -1  # some empty slots
    return CostOperator(idx, costs, cap=1.0)


@pytest.mark.parametrize("ties", [False, True])
def test_symmetrized_is_the_union_with_the_smaller_cost(ties):
    op = _random_operator(300, 9, seed=2, ties=ties)
    dense = op.dense()
    expected = np.minimum(dense, dense.T)
    sym = op.symmetrized()
    np.testing.assert_array_equal(sym.dense(), expected)
    filled = sym.costs[sym.indices >= 0]
    assert sym.is_symmetric and not op.is_symmetric
    for row in range(0, 300, 17):  # cheapest first within each row
        ids, cs = sym.indices[row], sym.costs[row]
        assert np.all(np.diff(cs[ids >= 0]) >= 0)
    pairs = {(int(i), int(j)) for i, row in enumerate(op.indices) for j in row if j >= 0}
    assert filled.size == len(pairs | {(j, i) for i, j in pairs})  # one slot per pair of the union


def test_symmetrized_is_made_once_and_a_symmetric_operator_is_its_own():
    op = _random_operator(200, 6, seed=3)
    sym = op.symmetrized()
    assert op.symmetrized() is sym and sym.symmetrized() is sym


def test_regularizer_from_store_reuses_the_stores_symmetrized_operator(small_store):
    first = regularizer_from_store(small_store, "sinkhorn", metric="knn", support=8)
    second = regularizer_from_store(small_store, "sinkhorn", metric="knn", support=8)
    assert first.op is second.op is small_store.operator("knn").symmetrized()
    assert first.op.is_symmetric
