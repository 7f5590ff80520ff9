"""Tree builders (recursive k-means, Ward): valid trees, exact path sums, metric axioms."""

from __future__ import annotations

import numpy as np
import pytest

from vocabmetric.errors import VocabMetricError
from vocabmetric.metrics import TreeBuilder, WardTreeBuilder


@pytest.fixture(scope="module")
def clustered():
    """250 points in 5 Gaussian clusters (d=12), with two exact duplicates and 4 untrained."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 12)) * 2
    label = rng.integers(0, 5, 250)
    x = (centers[label] + 0.4 * rng.normal(size=(250, 12))).astype(np.float32)
    x[21] = x[20]
    trained = np.ones(250, bool)
    trained[[0, 99, 100, 249]] = False
    return x, trained, label


@pytest.fixture(scope="module", params=["kmeans", "ward"])
def fitted(request, clustered):
    x, trained, _ = clustered
    builder = TreeBuilder(branching=4, max_leaf_size=6, n_trees=1) if request.param == "kmeans" else WardTreeBuilder(n_neighbors=6)
    return builder.fit(x, trained), x, trained


def path_to_root(parent, weight, v):
    """[(node, distance from v)] from v up to the root, by walking parents."""
    out, d = [(v, 0.0)], 0.0
    while parent[v] >= 0:
        d += weight[v]
        v = parent[v]
        out.append((v, d))
    return out


def brute_distance(parent, weight, a, b):
    up_a = dict(path_to_root(parent, weight, a))
    for node, d_b in path_to_root(parent, weight, b):
        if node in up_a:  # the first common ancestor
            return up_a[node] + d_b
    raise AssertionError("no common ancestor")


def test_tree_is_valid(fitted):
    b, x, trained = fitted
    parent, weight, leaf = b.parent_, b.weight_, b.leaf_of_token_
    V, n = len(x), len(parent)
    roots = np.flatnonzero(parent == -1)
    assert len(roots) == 1
    root = roots[0]
    # every token is exactly one leaf: distinct nodes, none of them anyone's parent
    assert leaf.shape == (V,) and len(np.unique(leaf)) == V
    assert not np.isin(leaf, parent).any()
    # acyclic and connected: every node reaches the root in fewer than n steps
    for v in range(n):
        steps = 0
        while v != root:
            v = parent[v]
            steps += 1
            assert steps < n
    assert np.all(weight[np.arange(n) != root] > 0) and weight[root] == 0
    # every internal node has at least two children (no useless chains) except in a chain of one token
    children = np.bincount(parent[parent >= 0], minlength=n)
    internal = np.setdiff1d(np.arange(n), leaf)
    assert np.all(children[internal] >= 2)
    b.to_tree()  # TreeMetric's own validation


def test_distance_equals_brute_force_path_sum(fitted):
    b, x, trained = fitted
    tree = b.to_tree()
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, len(x), 300), rng.integers(0, len(x), 300)
    got = tree.distance(i, j)
    want = [brute_distance(b.parent_, b.weight_, b.leaf_of_token_[p], b.leaf_of_token_[q]) for p, q in zip(i, j)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_tree_distance_is_a_metric(fitted):
    b, x, trained = fitted
    d = b.to_tree().dense()
    assert np.all(np.diag(d) == 0)
    np.testing.assert_allclose(d, d.T)
    off = ~np.eye(len(x), dtype=bool)
    assert d[off].min() > 0  # distinct tokens, even duplicate vectors, are apart
    rng = np.random.default_rng(2)
    a, m, c = rng.integers(0, len(x), (3, 20000))
    assert np.all(d[a, c] <= d[a, m] + d[m, c] + 1e-12)
    # a tree metric is an ultrametric-like 4-point metric: d(a,c)+d(m,e) <= max of the other two sums
    e = rng.integers(0, len(x), 20000)
    s1, s2, s3 = d[a, c] + d[m, e], d[a, m] + d[c, e], d[a, e] + d[m, c]
    top2 = np.sort(np.stack([s1, s2, s3]), axis=0)
    np.testing.assert_allclose(top2[2], top2[1], rtol=1e-9, atol=1e-12)


def test_untrained_tokens_hang_under_the_root_at_half_cap(fitted):
    b, x, trained = fitted
    tree = b.to_tree()
    untrained = np.flatnonzero(~trained)
    assert np.all(b.parent_[untrained] == tree.root)
    np.testing.assert_allclose(b.weight_[untrained], b.cap_ / 2)
    assert tree.distance(0, 99) == pytest.approx(b.cap_)
    t = np.flatnonzero(trained)[:10]
    np.testing.assert_allclose(tree.distance(np.full(10, 0), t), b.cap_ / 2 + tree.dist_to_root[t])
    # the cap is the p99 of random trained pairs: most trained pairs are below it
    pairs = tree.dense()[np.ix_(np.flatnonzero(trained), np.flatnonzero(trained))]
    assert 0.95 < np.mean(pairs <= b.cap_ + 1e-12) < 1.0


def test_tree_groups_the_clusters(fitted, clustered):
    """Same-cluster pairs are closer in the tree than cross-cluster pairs (on average)."""
    b, x, trained = fitted
    label = clustered[2]
    ids = np.flatnonzero(trained)
    d = b.to_tree().dense()[np.ix_(ids, ids)]
    same = label[ids][:, None] == label[ids][None, :]
    np.fill_diagonal(same, False)
    cross = label[ids][:, None] != label[ids][None, :]
    assert d[same].mean() < 0.5 * d[cross].mean()


def test_builder_errors(clustered):
    x, trained, _ = clustered
    with pytest.raises(VocabMetricError, match="branching must be an integer >= 2"):
        TreeBuilder(branching=1).fit(x, trained)
    with pytest.raises(VocabMetricError, match="cap=-1.0 must be finite and > 0"):
        TreeBuilder(cap=-1.0).fit(x, trained)
    with pytest.raises(VocabMetricError, match="n_neighbors=246 must be smaller"):
        WardTreeBuilder(n_neighbors=246).fit(x, trained)
    with pytest.raises(VocabMetricError, match="not fitted"):
        TreeBuilder().to_tree()


def test_fitted_weights_raise_spearman_on_planted_clusters():
    from scipy.stats import spearmanr

    from vocabmetric._util.vectors import l2_distance

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)) * rng.uniform(0.5, 3, size=(8, 1))
    x = (centers[rng.integers(0, 8, 600)] + 0.5 * rng.normal(size=(600, 16))).astype(np.float32)
    trained = np.ones(600, bool)
    trained[:5] = False
    a, b = rng.integers(5, 600, 3000), rng.integers(5, 600, 3000)
    rho = {}
    for fit in (False, True):
        builder = TreeBuilder(branching=4, max_leaf_size=8, n_trees=1, fit_weights=fit, n_pairs=5000).fit(x, trained)
        rho[fit] = spearmanr(builder.to_tree().distance(a, b), l2_distance(x, a, b)).statistic
        assert builder.params_["fit_weights"] is fit
    assert rho[True] > rho[False] + 0.01
    assert builder.params_["weight_fit"]["n_pairs"] == 5000
    assert np.all(builder.weight_ >= 0) and builder.weight_[0] == pytest.approx(builder.cap_ / 2)


def test_weight_fit_sample_and_flag_are_validated():
    from vocabmetric.errors import ConfigError

    x = np.random.default_rng(1).normal(size=(12, 4)).astype(np.float32)
    with pytest.raises(ConfigError, match="n_pairs = 1000 cannot be sampled: 12 trained tokens give only 66"):
        TreeBuilder(branching=2, max_leaf_size=2, fit_weights=True, n_pairs=1000).fit(x)
    with pytest.raises(ConfigError, match="n_pairs"):
        TreeBuilder(n_pairs=0).validate()
    with pytest.raises(ConfigError, match="fit_weights"):
        TreeBuilder(fit_weights="yes").validate()
    TreeBuilder(branching=2, max_leaf_size=2, fit_weights=True, n_pairs=60).fit(x)  # reachable
