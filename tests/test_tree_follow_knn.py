"""Trees whose splits follow the kNN graph (TreeBuilder follow_knn): near tokens share a low
ancestor, so the tree keeps l2's near/far contrast better than plain k-means splits."""

from __future__ import annotations

import numpy as np
import pytest

from vocabmetric._util.vectors import l2_distance, normalized
from vocabmetric.errors import ConfigError
from vocabmetric.metrics import KnnMetric, TreeBuilder
from vocabmetric.metrics._tree import follow_neighbors
from vocabmetric.building.metrics_stage import validate_metrics


def test_a_member_moves_to_the_side_of_its_neighbours():
    # positions 0-3 and 4-7 are two neighbourhoods; k-means put 3 and 4 on the wrong side
    neighbors = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2],
                          [5, 6, 7], [4, 6, 7], [4, 5, 7], [4, 5, 6], [8, 8, 8]])  # 8 = padding (not a member)
    side = np.full(9, -1)
    labels = follow_neighbors(np.array([0, 0, 0, 1, 0, 1, 1, 1]), np.arange(8), neighbors, side, 5, 2)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1, 1])
    assert np.all(side == -1)  # the scratch is left clean for the next split
    # a round that would empty a group is not taken: everyone's neighbours are in group 0
    all_zero = np.zeros((4, 3), np.int64)
    labels = follow_neighbors(np.array([0, 0, 0, 1]), np.arange(4), all_zero, np.full(5, -1), 5, 2)
    assert set(labels) == {0, 1}


def _manifold(seed: int, n: int = 800):
    """Points near a 4-dimensional subspace of R^16: no clusters, so a k-means cut splits neighbours."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    return (z @ rng.normal(size=(4, 16)) + 0.3 * rng.normal(size=(n, 16))).astype(np.float32)


@pytest.mark.parametrize("fit_weights", [False, True])
def test_following_the_knn_graph_brings_the_near_far_contrast_toward_l2s(fit_weights):
    x = _manifold(0)
    trained = np.ones(len(x), bool)
    rng = np.random.default_rng(1)
    knn = KnnMetric(10, progress=False).fit(x, trained).indices_
    src = rng.choice(len(x), 200, replace=False)
    i, j = np.repeat(src, 10), knn[src].ravel()
    a, b = rng.integers(0, len(x), 4000), rng.integers(0, len(x), 4000)
    l2_contrast = l2_distance(normalized(x), i, j).mean() / np.median(l2_distance(normalized(x), a, b))
    contrast = {}
    for rounds in (0, 10):
        builder = TreeBuilder(n_trees=2, follow_knn=rounds, fit_weights=fit_weights, n_pairs=10000, seed=3, niter=8)
        tree = builder.fit(x, trained).to_tree()
        contrast[rounds] = tree.distance(i, j).mean() / np.median(tree.distance(a, b))
        assert builder.params_["follow_knn"] == rounds
    # plain k-means trees make near pairs relatively dearer than l2 does; following the graph
    # removes a good part of that excess (seeds 0-3 keep 59-80% of it)
    assert contrast[0] > l2_contrast
    assert contrast[10] - l2_contrast < 0.85 * (contrast[0] - l2_contrast)


def test_follow_knn_is_validated():
    with pytest.raises(ConfigError, match=r"follow_knn must be an integer >= 0, got -1"):
        TreeBuilder(follow_knn=-1).validate()
    with pytest.raises(ConfigError, match=r"metrics.tree.*follow_knn"):
        validate_metrics({"tree": {"builder": "kmeans", "follow_knn": "yes"}})
    with pytest.raises(ConfigError, match=r"metrics.tree.*follow_knn.*2\.5"):
        validate_metrics({"tree": {"builder": "kmeans", "follow_knn": 2.5}})
