"""Cost shaping: each claimed property tested, each bad setting refused by name."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vocabmetric import open_store
from vocabmetric.building.embeddings import Embeddings
from vocabmetric.errors import ConfigError
from vocabmetric.metrics import CostShape, KnnMetric, TreeBuilder, TreeRefit, WardTreeBuilder
from vocabmetric.query.report import info_table
from vocabmetric.store import TruncatedMetric, write_store


def _unit_points(seed: int, n: int, d: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dense_l2(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None] - x[None], axis=2)


def _triangle_gap(d: np.ndarray) -> float:
    """min over all triples of d(i,k) + d(k,j) − d(i,j) (≥ 0: the triangle inequality holds)."""
    return float((d[:, :, None] + d[None, :, :].transpose(0, 2, 1) - d[:, None, :]).min())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), exponent=st.floats(0.05, 1.0), n=st.integers(3, 12), d=st.integers(1, 6))
def test_power_at_most_one_keeps_the_triangle_inequality(seed, exponent, n, d):
    """Every triple of l2 distances among random unit vectors, shaped with α ≤ 1."""
    dist = _dense_l2(_unit_points(seed, n, d))
    cap = 2.0
    shape = CostShape("power", exponent=exponent).fit(np.zeros(0), cap)
    shaped = shape.transform(dist, cap)
    assert _triangle_gap(shaped) >= -1e-12
    np.testing.assert_array_equal(shaped, shaped.T)  # symmetry: c'(i,j) depends on c(i,j) alone
    assert "triangle inequality" in shape.keeps() and "not" not in shape.keeps()


@pytest.mark.parametrize("exponent", [1.5, 2.0, 4.0])
def test_power_above_one_breaks_the_triangle_inequality_and_says_so(exponent):
    """Three points on a great circle: the middle one splits the chord nearly in two, and
    a convex power makes the two halves cheaper than the whole."""
    angles = np.array([0.0, 0.2, 0.4])
    x = np.stack([np.cos(angles), np.sin(angles)], 1)
    shape = CostShape("power", exponent=exponent).fit(np.zeros(0), 2.0)
    shaped = shape.transform(_dense_l2(x), 2.0)
    assert _triangle_gap(shaped) < 0
    assert "not the triangle inequality" in shape.keeps()
    np.testing.assert_array_equal(shaped, shaped.T)


def test_every_shape_keeps_zero_the_cap_and_the_order():
    c = np.linspace(0, 1.3, 50)
    for shape in (CostShape("power", exponent=3.0), CostShape("power", exponent=0.5), CostShape("none")):
        s = shape.fit(np.zeros(0), 1.3).transform(c, 1.3)
        assert s[0] == 0 and s[-1] == pytest.approx(1.3) and np.all(np.diff(s) > 0)
        assert np.all((s >= 0) & (s <= 1.3))


@pytest.fixture(scope="module")
def points():
    x = np.random.default_rng(1).normal(size=(400, 12)).astype(np.float32)
    trained = np.ones(400, bool)
    trained[-5:] = False
    return x, trained


def test_fraction_is_fitted_and_keeps_rows(points):
    x, trained = points
    plain = KnnMetric(k=16, progress=False).fit(x, trained)
    shaped = KnnMetric(k=16, shape="fraction", shape_fraction=0.2, shape_rank=10, progress=False).fit(x, trained)
    assert shaped.cap_ == plain.cap_ and np.array_equal(shaped.indices_, plain.indices_)  # same lists, same cap
    rows = np.flatnonzero(trained)
    assert np.median(shaped.costs_[rows, 9]) == pytest.approx(0.2 * shaped.cap_, rel=1e-5)
    assert np.all(np.diff(shaped.costs_[rows], axis=1) >= 0)  # rows still sorted
    assert np.all(shaped.costs_[~trained] == np.float32(shaped.cap_))  # empty slots keep the cap
    info = shaped.params_["shape"]
    assert info["shape"] == "fraction" and info["exponent"] > 1 and "not the triangle inequality" in info["keeps"]
    # contrast: a neighbour's share of the cap falls
    assert np.median(shaped.costs_[rows, 0] / shaped.cap_) < np.median(plain.costs_[rows, 0] / plain.cap_)
    # symmetry: a pair stored in both rows costs the same both ways
    op = shaped.to_operator()
    i, j = np.repeat(rows, 16), shaped.indices_[rows].ravel()
    both = np.isin(i, op.indices[j].ravel()) & (op.cost(j, i) < op.cap)
    assert both.sum() > 100
    np.testing.assert_array_equal(op.cost(i[both], j[both]), op.cost(j[both], i[both]))


def test_rank_is_not_symmetric(points):
    x, trained = points
    m = KnnMetric(k=8, shape="rank", progress=False).fit(x, trained)
    rows = np.flatnonzero(trained)
    np.testing.assert_allclose(m.costs_[rows], np.broadcast_to(m.cap_ * np.arange(1, 9) / 9, (len(rows), 8)), rtol=1e-6)
    op = m.to_operator()
    i, j = np.repeat(rows, 8), m.indices_[rows].ravel()
    back = op.cost(j, i)
    stored_back = back < op.cap
    assert np.any(op.cost(i, j)[stored_back] != back[stored_back])  # the claim: not symmetric
    assert "not symmetric" in m.params_["shape"]["keeps"]


@pytest.mark.parametrize("kw, match", [
    ({"shape": "fraction", "shape_fraction": 0.0}, r"shape_fraction = 0.0 must be in \(0, 1\)"),
    ({"shape": "fraction", "shape_fraction": 1.0}, r"shape_fraction = 1.0 must be in \(0, 1\)"),
    ({"shape": "fraction", "shape_fraction": float("nan")}, r"shape_fraction = nan must be in \(0, 1\)"),
    ({"shape": "power", "shape_exponent": 0.0}, r"shape_exponent = 0.0 must be a finite number > 0.*not increasing"),
    ({"shape": "power", "shape_exponent": -2.0}, r"shape_exponent = -2.0"),
    ({"shape": "log"}, r"shape must be one of 'none', 'power', 'fraction', 'rank', got 'log'"),
    ({"shape": "fraction", "shape_rank": 0}, r"shape_rank must be an integer >= 1, got 0"),
])
def test_bad_settings_are_config_errors_naming_them(kw, match):
    with pytest.raises(ConfigError, match=match):
        KnnMetric(**kw).validate()
    with pytest.raises(ConfigError, match=match):
        TreeBuilder(**kw).validate()


def test_tree_shape_settings(points):
    with pytest.raises(ConfigError, match=r"\[metrics.tree\] shape = 'rank' ranks a stored neighbour table"):
        TreeBuilder(shape="rank").validate("[metrics.tree]")
    with pytest.raises(ConfigError, match="set fit_weights = true"):
        WardTreeBuilder(shape="power", shape_exponent=2.0, fit_weights=False).validate()
    with pytest.raises(ConfigError, match="shape_rank = 11"):
        TreeBuilder(shape="fraction", shape_rank=11).validate()
    from vocabmetric.building.metrics_stage import validate_metrics

    with pytest.raises(ConfigError, match="metrics.l2.shape: unknown key"):
        validate_metrics({"l2": {"shape": "power"}})  # l2 is exact on demand: never shaped


def test_shaped_tree_lowers_the_near_price(points):
    """A tree fitted to shaped distances charges a neighbour a smaller share of a stranger."""
    x, trained = points
    knn = KnnMetric(k=10, progress=False).fit(x, trained)
    rows = np.flatnonzero(trained)
    rng = np.random.default_rng(0)
    far = rng.choice(rows, len(rows))
    ratio = {}
    for shape in ("none", "fraction"):
        t = WardTreeBuilder(n_neighbors=8, shape=shape, shape_fraction=0.2, n_pairs=20_000).fit(
            x, trained, knn=(knn.indices_, knn.costs_))
        tree = t.to_tree()
        ok = far != rows
        ratio[shape] = np.mean(tree.distance(rows[ok], knn.indices_[rows[ok], 0]) / tree.distance(rows[ok], far[ok]))
        assert (shape == "none") == ("shape" not in t.params_)
    assert ratio["fraction"] < 0.8 * ratio["none"]


def test_store_records_the_shape_and_info_shows_it(points, tmp_path):
    x, trained = points
    shaped = KnnMetric(k=8, shape="power", shape_exponent=2.0, progress=False).fit(x, trained)
    plain = KnnMetric(k=8, progress=False).fit(x, trained)
    path = tmp_path / "metric.zarr"
    V = len(x)
    write_store(path, tokenizer=SimpleNamespace(spec="test:shape", fingerprint="ab" * 32),
                token_bytes=[f"t{i}".encode() for i in range(V)], counts=np.ones(V, np.int64),
                embeddings=Embeddings(x, trained, np.full(V, -1, np.int32), "test"), corpus={"sources": []},
                metrics={"knn": TruncatedMetric(shaped.indices_, shaped.costs_, shaped.cap_, shaped.params_),
                         "plain": TruncatedMetric(plain.indices_, plain.costs_, plain.cap_, plain.params_)})
    store = open_store(path)
    assert store.metric_attrs("knn")["shape"]["exponent"] == 2.0
    assert "shape" not in store.metric_attrs("plain")  # a store built before shaping reads as "none"
    text = info_table(store)
    assert "power^2" in text and "shape of knn: power, cost = cap·(c/cap)^2; keeps symmetry, not the triangle" in text
    assert "shape of plain" not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("plain"))
    assert " none " in line


def test_ward_tree_says_how_components_are_joined():
    """Two clusters far apart: the kNN graph falls in two; the builder warns, names the
    setting, records it, and the joined tree still separates the clusters."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(60, 6)) + 20 * np.eye(6)[0], rng.normal(size=(60, 6)) - 20 * np.eye(6)[0]])
    with pytest.warns(UserWarning, match=r"n_neighbors = 5\) of the 120 trained tokens has 2 components; they are joined"):
        t = WardTreeBuilder(n_neighbors=5, n_pairs=3000).fit(x.astype(np.float32))
    assert t.params_["components"] == 2 and t.params_["builder"] == "ward"
    tree = t.to_tree()
    within, across = tree.distance(np.arange(59), np.arange(1, 60)), tree.distance(np.arange(60), np.arange(60, 120))
    assert np.isfinite(across).all() and within.max() < across.min()


def test_refit_keeps_the_topology_and_takes_a_shape(points):
    x, trained = points
    built = TreeBuilder(n_trees=2, progress=False, n_pairs=20_000).fit(x, trained)
    plain = TreeRefit(n_pairs=20_000).fit(x, trained, trees=built.to_tree())
    shaped = TreeRefit(n_pairs=20_000, shape="power", shape_exponent=3.0).fit(x, trained, trees=built.to_tree())
    for r in (plain, shaped):
        assert np.array_equal(r.parent_, built.parent_) and r.params_["n_trees"] == 2  # the same trees
    assert "shape" not in plain.params_ and shaped.params_["shape"]["exponent"] == 3.0
    rows = np.flatnonzero(trained)
    far = np.random.default_rng(0).choice(rows, len(rows))
    knn = KnnMetric(k=1, progress=False).fit(x, trained)
    ok = far != rows

    def price(tree):
        return np.mean(tree.distance(rows[ok], knn.indices_[rows[ok], 0]) / tree.distance(rows[ok], far[ok]))

    assert price(shaped.to_tree()) < 0.9 * price(plain.to_tree())  # 0.64 against 0.73 here
    with pytest.raises(ConfigError, match="shape = 'rank'"):
        TreeRefit(shape="rank").fit(x, trained, trees=built.to_tree())


def test_ward_top_size_keeps_the_graph_merges_below_and_rebuilds_the_top(points):
    x, trained = points
    knn = KnnMetric(k=10, progress=False).fit(x, trained)
    table = (knn.indices_, knn.costs_)
    graph = WardTreeBuilder(fit_weights=False).fit(x, trained, knn=table)
    topped = WardTreeBuilder(fit_weights=False, top_size=20).fit(x, trained, knn=table)
    assert topped.params_["top_size"] == 20 and topped.params_["n_nodes"] == graph.params_["n_nodes"]  # binary
    g, t = graph.to_tree(), topped.to_tree()
    rows = np.flatnonzero(trained)
    # a pair whose lowest common ancestor holds <= 20 tokens in the graph tree is merged the same way
    sizes = np.bincount(g.parent[rows], minlength=len(g.parent))  # tokens hung directly: leaf clusters
    i, j = rows[:-1], rows[1:]
    same_leaf = g.parent[i] == g.parent[j]
    np.testing.assert_allclose(g.distance(i[same_leaf], j[same_leaf]), t.distance(i[same_leaf], j[same_leaf]))
    assert sizes.max() <= 2  # a binary merge tree: at most two tokens share a parent
    with pytest.raises(ConfigError, match="top_size must be an integer >= 2 or unset, got 1"):
        WardTreeBuilder(top_size=1).validate()


def test_several_ward_trees_merge_on_seeded_coordinate_shares_and_fit_their_mean(points):
    """n_trees = 3: three different trees over the same tokens and root, each merged on its own
    seeded half of the coordinates, their weights fitted so that the mean tracks l2 better than
    one tree; n_trees = 1 is the plain tree, merged on every coordinate."""
    from scipy.stats import spearmanr

    from vocabmetric._util.vectors import l2_distance

    x, trained = points
    knn = KnnMetric(k=10, progress=False).fit(x, trained)
    table = (knn.indices_, knn.costs_)
    one = WardTreeBuilder(n_pairs=20_000).fit(x, trained, knn=table)
    three = WardTreeBuilder(n_trees=3, n_pairs=20_000).fit(x, trained, knn=table)
    again = WardTreeBuilder(n_trees=3, n_pairs=20_000).fit(x, trained, knn=table)
    assert one.params_["n_trees"] == 1 and "subspace" not in one.params_
    assert three.params_["n_trees"] == 3 and three.params_["subspace"] == 0.5
    trees = three.to_trees()
    assert len({t.parent.tobytes() for t in trees}) == 3  # three topologies
    assert len({int(np.flatnonzero(t.parent < 0)[0]) for t in trees}) == 1  # one root
    assert all(np.array_equal(a.parent, b.parent) for a, b in zip(trees, again.to_trees()))  # seeded
    plain = WardTreeBuilder(n_pairs=20_000, fit_weights=False).fit(x, trained, knn=table)
    assert not np.array_equal(plain.parent_, trees[0].parent)  # the first of three merges on its half only
    rows = np.flatnonzero(trained)
    rng = np.random.default_rng(0)
    a, b = rng.choice(rows, 4000), rng.choice(rows, 4000)
    ok = a != b
    l2 = l2_distance(x, a[ok], b[ok])
    fidelity = {name: spearmanr(t.to_tree().distance(a[ok], b[ok]), l2)[0] for name, t in (("one", one), ("three", three))}
    assert fidelity["three"] > fidelity["one"] + 0.1, fidelity  # 0.37 against 0.17 here


def test_a_fraction_that_would_flatten_the_cost_warns_naming_the_setting(points):
    x, trained = points
    # the 10th neighbour of these points costs far more than 0.05 of the cap: asking for 0.9 raises it
    with pytest.warns(UserWarning, match=r"shape_fraction = 0\.9 flattens this cost.*exponent is 0\.\d+ < 1"):
        KnnMetric(k=16, shape="fraction", shape_fraction=0.9, progress=False).fit(x, trained)


# -- defaults by embeddings -----------------------------------------------------------------
def test_imported_embeddings_get_the_sharpened_knn_and_the_ward_tree_unless_a_table_says_otherwise():
    from vocabmetric.building.metrics_stage import IMPORTED_DEFAULTS, with_embedding_defaults

    metrics = {"knn": {"k": 32}, "geodesic": {"k_graph": 10, "k": 64}, "tree": {}}
    assert with_embedding_defaults(metrics, "word2vec") == metrics  # word2vec: the builders' own defaults
    got = with_embedding_defaults(metrics, "import")
    assert got["knn"] == {"k": 32, **IMPORTED_DEFAULTS["knn"]}
    assert got["tree"] == IMPORTED_DEFAULTS["tree"] and got["tree"]["builder"] == "ward"
    assert got["geodesic"] == metrics["geodesic"]  # a path metric: no default shape
    # a table's own keys win; a set shape takes no shape default; another builder no tree default
    kept = with_embedding_defaults({"knn": {"shape": "none"}, "tree": {"builder": "kmeans", "n_trees": 2},
                                    "near": {"kind": "knn", "shape_fraction": 0.1}}, "import")
    assert kept["knn"] == {"shape": "none"} and kept["tree"] == {"builder": "kmeans", "n_trees": 2}
    assert kept["near"]["shape"] == "fraction" and kept["near"]["shape_fraction"] == 0.1
    # a small k reads the fraction at its last neighbour, not at an absent 10th
    assert with_embedding_defaults({"knn": {"k": 4}}, "import")["knn"]["shape_rank"] == 4


def test_a_kmeans_key_without_a_builder_on_imported_embeddings_says_which_builder_to_name():
    from vocabmetric.building.metrics_stage import with_embedding_defaults

    with pytest.raises(ConfigError, match=r'metrics\.tree\.branching: .*defaults to "ward".*set builder = "kmeans"'):
        with_embedding_defaults({"tree": {"branching": 4}}, "import")
    forest = with_embedding_defaults({"tree": {"n_trees": 2}}, "import")["tree"]  # Ward grows several trees too
    assert forest["builder"] == "ward" and forest["n_trees"] == 2
