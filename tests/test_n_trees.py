"""Several trees averaged: [metrics.tree] n_trees, the stacked store layout, the mean cost, and
TreeWasserstein over T trees = the mean of the per-tree exact W1s (against POT's ot.emd2)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import ot
import pytest
import torch

from vocabmetric import open_store
from vocabmetric.building.embeddings import Embeddings
from vocabmetric.errors import ConfigError
from vocabmetric.metrics import TreeBuilder
from vocabmetric.building.metrics_stage import validate_metrics
from vocabmetric.cost import TreeEnsemble, TreeMetric
from vocabmetric.regularizers import TreeWasserstein
from vocabmetric.store import TreeArrays, write_store

N_TREES = 3


@pytest.fixture(scope="module")
def clustered():
    """150 points in 4 Gaussian clusters (d=8); 5 untrained."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 2
    x = (centers[rng.integers(0, 4, 150)] + 0.5 * rng.normal(size=(150, 8))).astype(np.float32)
    trained = np.ones(150, bool)
    trained[[0, 7, 70, 71, 149]] = False
    return x, trained


def write(path, x, trained, tree: TreeArrays):
    V = len(x)
    emb = Embeddings(x, trained, np.full(V, -1, np.int32), "word2vec", {"dim": x.shape[1]})
    return open_store(write_store(path, tokenizer=SimpleNamespace(spec="test:tiny", fingerprint="cd" * 32),
                                  token_bytes=[f"t{i}".encode() for i in range(V)], counts=np.ones(V, np.int64),
                                  embeddings=emb, corpus={"sources": ["x.txt"]}, tree=tree))


@pytest.fixture(scope="module")
def forest(clustered, tmp_path_factory):
    x, trained = clustered
    b = TreeBuilder(branching=2, max_leaf_size=4, n_trees=N_TREES, seed=5).fit(x, trained)
    store = write(tmp_path_factory.mktemp("forest") / "metric.zarr", x, trained,
                  TreeArrays(b.parent_, b.weight_, b.leaf_of_token_, b.params_, offsets=b.offsets_))
    return b, store


def test_every_tree_is_stored_and_read_back(forest):
    b, store = forest
    assert store.n_trees == N_TREES == len(store.trees()) == b.params_["n_trees"]
    assert isinstance(store.tree(), TreeEnsemble) and store.tree().fingerprint == "cd" * 32
    for got, fitted in zip(store.trees(), b.trees_):
        np.testing.assert_array_equal(got.parent, fitted.parent)
        np.testing.assert_array_equal(got.weight, fitted.weight)
        np.testing.assert_array_equal(got.leaf_of_token, fitted.leaf_of_token)
    # different seeds grow different trees
    assert not np.array_equal(b.trees_[0].parent, b.trees_[1].parent)


def test_tree_cost_is_the_mean_over_the_trees(forest, clustered):
    b, store = forest
    _, trained = clustered
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, store.vocab_size, 400), rng.integers(0, store.vocab_size, 400)
    per_tree = np.stack([t.distance(i, j) for t in store.trees()])
    np.testing.assert_allclose(store.pair_costs(i, j, "tree"), per_tree.mean(0), rtol=1e-6)
    assert store.cost(3, 40, metric="tree") == pytest.approx(np.mean([t.distance(3, 40) for t in b.trees_]), rel=1e-6)
    assert np.ptp(per_tree, axis=0).max() > 0  # the trees disagree somewhere: the mean is not any one of them
    # two untrained tokens cost the cap in every tree, so in the mean too
    assert store.cost(0, 7, metric="tree") == pytest.approx(b.cap_, rel=1e-6)
    # the cap is the p99 of the mean over random trained pairs: most trained pairs cost less
    ids = np.flatnonzero(trained)
    assert np.mean(store.pair_costs(ids[:60, None], ids[None, :60], "tree") <= b.cap_) > 0.95


def small_forest(rng, vocab_size: int, n_trees: int) -> list[TreeMetric]:
    """Random trees with token i at node i and internal nodes after, some tokens on internal nodes."""
    trees = []
    for _ in range(n_trees):
        n_internal = 6
        parent = np.full(vocab_size + n_internal, -1)
        parent[vocab_size + 1:] = vocab_size + rng.integers(0, np.arange(1, n_internal))
        parent[:vocab_size] = vocab_size + rng.integers(0, n_internal, vocab_size)
        leaf = np.arange(vocab_size)
        leaf[:2] = vocab_size + rng.integers(0, n_internal, 2)  # two tokens sit on internal nodes
        trees.append(TreeMetric(parent, rng.random(len(parent)), leaf))
    return trees


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_penalty_over_trees_is_the_mean_of_single_tree_penalties(backend):
    rng = np.random.default_rng(2)
    V = 14
    trees = small_forest(rng, V, 4)
    logits = (torch.randn(3, V, dtype=torch.float64) * 2).requires_grad_()
    ref = torch.randn(3, V, dtype=torch.float64) * 2
    value = TreeWasserstein(trees, backend=backend)(logits, ref)
    p, q = torch.softmax(logits, -1).detach().numpy(), torch.softmax(ref, -1).numpy()
    exact = np.mean([[ot.emd2(a, b_, t.dense()) for a, b_ in zip(p, q)] for t in trees], axis=0)
    np.testing.assert_allclose(value.detach().numpy(), exact, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    singles = sum(TreeWasserstein(t, backend=backend)(logits, ref) for t in trees) / len(trees)
    (expected,) = torch.autograd.grad(singles.sum(), logits)
    np.testing.assert_allclose(grad.numpy(), expected.numpy(), rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(lambda z: TreeWasserstein(trees, backend=backend)(z, ref), (logits,))


def test_from_store_uses_every_tree(forest):
    _, store = forest
    reg = TreeWasserstein.from_store(store)
    assert reg.layout.n_roots == N_TREES and reg.fingerprint == store.fingerprint
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, store.vocab_size, dtype=torch.float64, generator=g) * 3
    ref = torch.randn(2, store.vocab_size, dtype=torch.float64, generator=g) * 3
    p, q = torch.softmax(logits, -1).numpy(), torch.softmax(ref, -1).numpy()
    under_mean_cost = [ot.emd2(a, b, store.tree().dense()) for a, b in zip(p, q)]
    value = reg(logits, ref).numpy()
    singles = np.mean([TreeWasserstein(t)(logits, ref).numpy() for t in store.trees()], axis=0)
    np.testing.assert_allclose(value, singles, rtol=1e-10)
    # min_π ⟨π, mean_t C_t⟩ ≥ mean_t min_π ⟨π, C_t⟩: the mean of tree W1s is at most W1 under the mean cost
    assert np.all(value <= np.array(under_mean_cost) + 1e-9) and np.all(value > 0.5 * np.array(under_mean_cost))


def test_n_trees_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"n_trees.*0"):
        TreeBuilder(n_trees=0).validate()
    with pytest.raises(ConfigError, match=r"\[metrics.tree\].*n_trees"):
        validate_metrics({"tree": {"builder": "kmeans", "n_trees": 0}})
    with pytest.raises(ConfigError, match="n_trees"):
        validate_metrics({"tree": {"builder": "kmeans", "n_trees": "4"}})


def test_a_weight_fit_that_cannot_reach_its_sample_is_a_config_error(clustered):
    x, trained = clustered
    n_trained = int(trained.sum())
    with pytest.raises(ConfigError, match=rf"n_pairs = 20000 cannot be sampled: {n_trained} trained tokens"):
        TreeBuilder(n_trees=2, fit_weights=True, n_pairs=20000).fit(x, trained)


def test_joint_weight_fit_brings_the_mean_closer_to_l2(clustered):
    x, trained = clustered
    b = TreeBuilder(branching=2, max_leaf_size=4, n_trees=2, fit_weights=True, n_pairs=3000).fit(x, trained)
    fit = b.params_["weight_fit"]
    assert fit["n_pairs"] == 3000 and fit["rms_after"] < fit["rms_before"]
    assert isinstance(b.to_tree(), TreeEnsemble) and b.to_tree().n_trees == 2


def test_a_single_tree_store_still_opens(clustered, tmp_path):
    """The layout before n_trees: parent, weight, leaf_of_token (V,), no offsets, no n_trees attr."""
    x, trained = clustered
    b = TreeBuilder(branching=3, max_leaf_size=4, n_trees=1, fit_weights=False).fit(x, trained)
    attrs = {k: v for k, v in b.params_.items() if k != "n_trees"}
    store = write(tmp_path / "old.zarr", x, trained, TreeArrays(b.parent_, b.weight_, b.leaf_of_token_, attrs))
    assert "metrics/tree/offsets" not in store._root
    assert store.n_trees == 1 and isinstance(store.tree(), TreeMetric) and len(store.trees()) == 1
    np.testing.assert_array_equal(store.tree().parent, b.parent_)
    assert store.cost(3, 40, metric="tree") == pytest.approx(b.to_tree().distance(3, 40), rel=1e-6)
    assert TreeWasserstein.from_store(store).layout.n_roots == 1
