"""Ground metrics on small real data: knn vs brute force, geodesic on a curved manifold,
umap, caps and the isolate policy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from vocabmetric.errors import VocabMetricError
from vocabmetric.metrics import (GeodesicMetric, KnnMetric, L2Metric, TreeBuilder, UmapMetric, WardTreeBuilder, TreeRefit,
                                 bounded_dijkstra, knn_graph)


def brute_l2(x: np.ndarray) -> np.ndarray:
    """All-pairs normalized Euclidean distance in float64 (numpy, from the differences)."""
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return np.linalg.norm(u[:, None, :] - u[None, :, :], axis=-1)


@pytest.fixture(scope="module")
def data():
    """300 random vectors with duplicates (ids 10, 11, 12 share a vector) and 5 untrained."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    x[11] = x[10]
    x[12] = x[10] * 3  # same direction: normalized duplicate
    trained = np.ones(300, dtype=bool)
    untrained = [3, 50, 51, 200, 299]
    trained[untrained] = False
    x[untrained[:2]] = 0.0  # untrained rows may even be zero
    return x, trained


def test_knn_matches_brute_force(data):
    x, trained = data
    k = 10
    knn = KnnMetric(k=k).fit(x, trained)
    full = brute_l2(np.where(trained[:, None], x, 1.0))
    ids = np.flatnonzero(trained)
    for i in ids:
        others = ids[ids != i]
        order = others[np.argsort(full[i, others], kind="stable")]
        want = full[i, order[:k]]
        # costs are the exact float64 distances of the true top-k (stored in float32)
        np.testing.assert_allclose(knn.costs_[i], want, rtol=1e-6, atol=1e-7)
        assert i not in knn.indices_[i]
        # the sets agree except among exact ties at the boundary
        boundary = full[i, order[k - 1]]
        assert set(order[full[i, order] < boundary]) <= set(knn.indices_[i])
    assert knn.indices_.dtype == np.int32 and knn.costs_.dtype == np.float32
    np.testing.assert_array_equal(L2Metric(k=k).fit(x, trained).indices_, knn.indices_)


def test_knn_duplicates_and_untrained(data):
    x, trained = data
    knn = KnnMetric(k=5).fit(x, trained)
    for i, twins in ((10, {11, 12}), (11, {10, 12}), (12, {10, 11})):
        row = dict(zip(knn.indices_[i].tolist(), knn.costs_[i].tolist()))
        assert i not in row  # the self hit is dropped by id even among exact ties
        assert twins <= set(row)
        # float64 from the difference: exact duplicates at 0; float32(3·x) is off x by ~1e-8
        assert all(row[t] < 1e-6 for t in twins)
    assert knn.costs_[10][knn.indices_[10] == 11] == 0.0 and knn.costs_[11][knn.indices_[11] == 10] == 0.0
    untrained = np.flatnonzero(~trained)
    assert np.all(knn.indices_[untrained] == -1)
    assert np.all(knn.costs_[untrained] == np.float32(knn.cap_))
    assert not np.isin(knn.indices_, untrained).any()
    op = knn.to_operator()
    assert op.cost(3, 50) == np.float32(knn.cap_) and op.cost(3, 3) == 0


def test_knn_hnsw_recall(data):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    exact = KnnMetric(k=10).fit(x)
    approx = KnnMetric(k=10, index="hnsw").fit(x)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.indices_, approx.indices_)])
    assert recall > 0.9
    # every stored hnsw cost is still the exact distance of its pair
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.repeat(np.arange(200), 10)
    want = np.linalg.norm(u[rows] - u[approx.indices_[:200].ravel()], axis=1)
    np.testing.assert_allclose(approx.costs_[:200].ravel(), want, rtol=1e-6)


def test_knn_bad_inputs(data):
    x, trained = data
    with pytest.raises(VocabMetricError, match="index must be 'flat' or 'hnsw'"):
        KnnMetric(index="ivf").fit(x, trained)
    with pytest.raises(VocabMetricError, match=r"k=295 must be smaller than the number of tokens with a vector \(295: trained"):
        KnnMetric(k=295).fit(x, trained)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(VocabMetricError, match="row 7"):
        KnnMetric().fit(bad, trained)
    with pytest.raises(VocabMetricError, match="all-zero"):
        KnnMetric().fit(x, np.ones(300, bool))


# -- geodesic -----------------------------------------------------------------------------
def spiral(n: int, seed: int = 0, dim: int = 10):
    """Points on a spiral (a Swiss roll's cross-section) placed in ``dim``-D by a random
    rotation, and the true arc length between them on the *normalized* curve (the l2 metric
    works on unit vectors, so that is the manifold it sees)."""
    rng = np.random.default_rng(seed)

    def curve(t):
        p = np.zeros((len(t), dim))
        p[:, 0], p[:, 1] = t * np.cos(t) / (4.5 * np.pi), t * np.sin(t) / (4.5 * np.pi)
        p[:, 2] = 1.5  # offset from the origin, so normalizing keeps the roll's shape
        return p

    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    t = np.sort(rng.uniform(1.5 * np.pi, 4.5 * np.pi, n))
    fine = np.linspace(1.5 * np.pi, 4.5 * np.pi, 200001)
    u = curve(fine)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(u, axis=0), axis=1))])
    s = np.interp(t, fine, arc)
    return (curve(t) @ rotation.T).astype(np.float32), np.abs(s[:, None] - s[None, :])


def test_geodesic_recovers_manifold_distance_far_better_than_l2():
    x, truth = spiral(400)
    geo = GeodesicMetric(k_graph=6, k=399).fit(x)
    d_geo = geo.to_operator().dense().astype(np.float64)
    d_l2 = brute_l2(x)
    upper = np.triu_indices(400, 1)
    rho_geo = spearmanr(d_geo[upper], truth[upper]).statistic
    rho_l2 = spearmanr(d_l2[upper], truth[upper]).statistic
    assert rho_geo > 0.99
    assert rho_l2 < 0.7
    # every path is at least as long as the straight line (triangle inequality of l2)
    assert np.all(d_geo[upper] >= d_l2[upper] - 1e-6)


def test_geodesic_top_k_equals_l2_top_k_when_k_le_k_graph(data):
    x, trained = data
    knn = KnnMetric(k=8).fit(x, trained)
    geo = GeodesicMetric(k_graph=8, k=8).fit(x, trained, knn=(knn.indices_, knn.costs_))
    ids = np.flatnonzero(trained)
    for i in ids:
        assert set(geo.indices_[i]) == set(knn.indices_[i])
    np.testing.assert_allclose(geo.costs_[ids], knn.costs_[ids], rtol=1e-6, atol=1e-7)
    assert np.all(geo.indices_[~trained] == -1)


def test_geodesic_disconnected_components_cost_the_cap():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 5)) * 0.05 + np.eye(5)[0]
    b = rng.normal(size=(30, 5)) * 0.05 + np.eye(5)[1]
    x = np.vstack([a, b]).astype(np.float32)
    geo = GeodesicMetric(k_graph=4, k=40).fit(x)
    op = geo.to_operator()
    assert np.all((op.indices >= 0).sum(1) == 29)  # only its own component is reachable
    left, right = np.arange(30), np.arange(30, 60)
    assert np.all(op.cost(left[:, None], right[None, :]) == np.float32(geo.cap_))
    assert np.all(op.costs[op.indices < 0] == np.float32(geo.cap_))
    assert np.all(op.cost(left[:, None], left[None, :]) < geo.cap_ + 1e-6)


def test_bounded_dijkstra_matches_scipy_on_a_random_graph():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    knn = KnnMetric(k=7).fit(x)
    indptr, nbr, w = knn_graph(knn.indices_.astype(np.int64), knn.costs_.astype(np.float64), 500)
    k = 60
    idx, lengths = bounded_dijkstra(indptr, nbr, w, np.arange(500), k, 500, n_jobs=2, batch_size=128)
    full = dijkstra(csr_matrix((w, nbr, indptr), shape=(500, 500)), directed=False)
    np.fill_diagonal(full, np.inf)
    want = np.sort(full, axis=1)[:, :k]
    np.testing.assert_allclose(lengths, want, rtol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(full, idx, 1), lengths, rtol=1e-9)


def test_dijkstra_scratch_bound_holds_on_a_star():
    """The kernel's scratch arrays hold (k+1)·max_degree+1 entries: at most k+1 nodes are
    settled (the source and k others) and each pushes at most max_degree. A star (one hub
    joined to everything) is the worst case: the hub's degree is V-1."""
    V = 300
    hub_edges = np.arange(1, V)
    rows = np.concatenate([np.zeros(V - 1, int), hub_edges])
    cols = np.concatenate([hub_edges, np.zeros(V - 1, int)])
    w = np.concatenate([np.linspace(1, 2, V - 1)] * 2)
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=V))])
    idx, lengths = bounded_dijkstra(indptr, cols[order].astype(np.int32), w[order], np.arange(V), 5, V)
    # from a leaf: the hub, then the hub's cheapest other leaves
    assert idx[7, 0] == 0 and lengths[7, 0] == pytest.approx(w[6])
    np.testing.assert_array_equal(idx[0], [1, 2, 3, 4, 5])


# -- umap -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(6, 16))
    x = (centers[rng.integers(0, 6, 400)] + 0.3 * rng.normal(size=(400, 16))).astype(np.float32)
    trained = np.ones(400, bool)
    trained[[0, 1]] = False
    return x, trained


@pytest.fixture(scope="module")
def umap_twice(clustered):
    """The same UMAP metric fitted twice with one seed (the second builds its own kNN)."""
    x, trained = clustered
    knn = KnnMetric(k=7).fit(x, trained)
    fit = lambda **kw: UmapMetric(n_components=2, k=8, n_neighbors=8, n_epochs=30, seed=0).fit(x, trained, **kw)
    return fit(knn=(knn.indices_, knn.costs_)), fit()


def test_umap_shapes_scale_and_determinism(clustered, umap_twice):
    x, trained = clustered
    a, b = umap_twice
    assert a.indices_.shape == (400, 8) and a.embedding_.shape == (400, 2)
    assert np.isnan(a.embedding_[~trained]).all() and np.isfinite(a.embedding_[trained]).all()
    assert np.all(a.indices_[~trained] == -1)
    np.testing.assert_array_equal(a.indices_, b.indices_)
    np.testing.assert_array_equal(a.costs_, b.costs_)
    # on the l2 scale: the p99 of random-pair costs matches l2's, so the cap sits in (0, 2]
    l2 = brute_l2(x[trained])
    p99_l2 = np.quantile(l2[np.triu_indices(len(l2), 1)], 0.99)
    assert a.cap_ == pytest.approx(p99_l2, rel=0.05)
    filled = a.indices_ >= 0
    assert a.costs_[filled].max() <= a.cap_ and a.costs_[filled].min() >= 0


def test_cap_bounds_every_stored_cost_for_every_metric(clustered, umap_twice):
    x, trained = clustered
    knn = KnnMetric(k=20).fit(x, trained)
    graph = (knn.indices_, knn.costs_)
    fitted = [knn, L2Metric(k=5).fit(x, trained), KnnMetric(k=5, index="hnsw").fit(x, trained),
              GeodesicMetric(k_graph=5, k=100).fit(x, trained, knn=graph), umap_twice[0]]
    for m in fitted:
        filled = m.indices_ >= 0
        assert m.costs_[filled].max() <= np.float32(m.cap_), m.kind
        assert np.all(m.costs_[~filled] == np.float32(m.cap_)), m.kind
        assert m.params_["cap"] == m.cap_ and "cap_statistic" in m.params_
        m.to_operator()  # the operator's own check (cap >= stored) passes
    with pytest.raises(VocabMetricError, match="cap=0.01 must be .* >= the largest stored cost"):
        GeodesicMetric(k_graph=5, k=50, cap=0.01).fit(x, trained, knn=graph)


# -- argument checks without embeddings ---------------------------------------------------
BAD_ARGUMENTS = [
    (UmapMetric, {"n_components": -1}, r"n_components must be an integer >= 1, got -1"),
    (UmapMetric, {"n_neighbors": 1}, r"n_neighbors must be an integer >= 2, got 1"),
    (UmapMetric, {"n_epochs": 0}, r"n_epochs must be an integer >= 1 or unset, got 0"),
    (UmapMetric, {"seed": -3}, r"seed must be an integer >= 0 or unset, got -3"),
    (KnnMetric, {"k": 0}, r"k must be an integer >= 1, got 0"),
    (KnnMetric, {"k": 2.5}, r"k must be an integer >= 1, got 2.5"),
    (KnnMetric, {"k": True}, r"k must be an integer >= 1, got True"),
    (KnnMetric, {"index": "ivf"}, r"index must be 'flat' or 'hnsw', got 'ivf'"),
    (KnnMetric, {"hnsw_m": 0}, r"hnsw_m must be an integer >= 1"),
    (KnnMetric, {"ef_search": -1}, r"ef_search must be an integer >= 1 or unset"),
    (L2Metric, {"batch_size": 0}, r"batch_size must be an integer >= 1"),
    (L2Metric, {"cap": float("nan")}, r"cap=nan must be finite and > 0"),
    (GeodesicMetric, {"k_graph": 0}, r"k_graph must be an integer >= 1, got 0"),
    (GeodesicMetric, {"n_jobs": 0}, r"n_jobs must be an integer >= 1, -1 or unset, got 0"),
    (GeodesicMetric, {"n_cap_sources": 0}, r"n_cap_sources must be an integer >= 1"),
    (GeodesicMetric, {"cap": "big"}, r"cap='big' must be finite and > 0"),
    (TreeBuilder, {"branching": 1}, r"branching must be an integer >= 2, got 1"),
    (TreeBuilder, {"max_depth": -1}, r"max_depth must be an integer >= 0, got -1"),
    (TreeBuilder, {"niter": 0}, r"niter must be an integer >= 1, got 0"),
    (WardTreeBuilder, {"n_neighbors": 0}, r"n_neighbors must be an integer >= 1, got 0"),
    (WardTreeBuilder, {"progress": "yes"}, r"progress must be true, false or unset, got 'yes'"),
    (WardTreeBuilder, {"n_trees": 0}, r"n_trees must be an integer >= 1, got 0"),
    (WardTreeBuilder, {"subspace": 0.0}, r"subspace = 0.0 must be a share of the coordinates in \(0, 1\]"),
    (WardTreeBuilder, {"subspace": 1.5}, r"subspace = 1.5 must be"),
]


@pytest.mark.parametrize("builder, kwargs, match", BAD_ARGUMENTS, ids=lambda v: getattr(v, "__name__", None))
def test_every_builder_argument_is_checked_without_embeddings(builder, kwargs, match):
    from vocabmetric.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{builder.__name__}: {match}"):
        builder(**kwargs).validate()
    with pytest.raises(ConfigError, match=rf"^\[metrics.x\] {match}"):
        builder(**kwargs).validate(where="[metrics.x]")


def test_default_builders_validate_and_fit_checks_first(data):
    from vocabmetric.errors import ConfigError

    for builder in (KnnMetric, L2Metric, GeodesicMetric, UmapMetric, TreeBuilder, WardTreeBuilder, TreeRefit):
        assert builder().validate() is not None
    x, trained = data
    with pytest.raises(ConfigError, match="n_components must be an integer >= 1"):
        UmapMetric(n_components=-1).fit(x, trained)


@pytest.mark.parametrize("builder", [KnnMetric, L2Metric, GeodesicMetric, UmapMetric, TreeBuilder, WardTreeBuilder, TreeRefit],
                         ids=lambda b: b.__name__)
def test_validate_covers_every_constructor_argument(builder):
    """A new constructor argument needs its rule in ``validate()``: no argument goes unchecked."""
    import inspect

    from vocabmetric.errors import ConfigError

    for name in list(inspect.signature(builder).parameters):
        with pytest.raises(ConfigError, match=rf"^{builder.__name__}: {name}\b|^{builder.__name__}: cap="):
            builder(**{name: object()}).validate()


def test_row_distances_equal_l2_distance_bit_for_bit_and_zero_on_empty_slots():
    from vocabmetric._util.vectors import l2_distance
    from vocabmetric._util.vectors import row_distances

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((500, 24)) * rng.uniform(0.1, 5, (500, 1))).astype(np.float32)
    rows = rng.choice(500, 120, replace=False)
    nbr = rng.integers(0, 500, (120, 9))
    nbr[rng.random(nbr.shape) < 0.1] = -1
    got = row_distances(x, rows, nbr, block=32)
    want = l2_distance(x, np.broadcast_to(rows[:, None], nbr.shape), np.maximum(nbr, 0))
    filled = nbr >= 0
    assert np.array_equal(got[filled], want[filled])
    assert np.all(got[~filled] == 0)
