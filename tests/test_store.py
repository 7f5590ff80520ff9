"""The zarr store: round trip of every array, queries by id and text, bad input, threads."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from vocabmetric import open_store
from vocabmetric.building.embeddings import Embeddings
from vocabmetric.errors import StoreError, TokenizerError, TokenNotFound, VocabMetricError
from vocabmetric.metrics import TreeBuilder
from vocabmetric.metrics import GeodesicMetric, KnnMetric, l2_distance
from vocabmetric.store import TreeArrays, TruncatedMetric, write_store

WORDS = [" cat", "cat", "Cat", " dog", " dogs", " house", "house", " the", " a", "ing", "\n", " dup", " dup", "42"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A store written by ``write_store`` from known arrays: (path, arrays it was given)."""
    rng = np.random.default_rng(0)
    token_bytes = [w.encode() for w in WORDS] + [bytes([b]) for b in range(0x80, 0x80 + 50)]  # invalid UTF-8 too
    V = len(token_bytes)
    vectors = rng.normal(size=(V, 8)).astype(np.float32)
    trained = np.ones(V, bool)
    trained[[2, 20, 30]] = False  # "Cat" is untrained
    borrowed = np.full(V, -1, np.int32)
    emb = Embeddings(vectors, trained, borrowed, "word2vec", {"dim": 8})
    knn = KnnMetric(k=6).fit(vectors, trained)
    geo = GeodesicMetric(k_graph=4, k=12).fit(vectors, trained, knn=(knn.indices_, knn.costs_))
    tree = TreeBuilder(branching=3, max_leaf_size=4, n_trees=1).fit(vectors, trained)
    counts = rng.integers(0, 1000, V)
    path = tmp_path_factory.mktemp("store") / "metric.zarr"
    write_store(
        path,
        tokenizer=SimpleNamespace(spec="test:tiny", fingerprint="ab" * 32),
        token_bytes=token_bytes, counts=counts, embeddings=emb, corpus={"sources": ["x.txt"], "n_tokens": 123},
        metrics={"knn": TruncatedMetric(knn.indices_, knn.costs_, knn.cap_, knn.params_),
                 "geodesic": TruncatedMetric(geo.indices_, geo.costs_, geo.cap_, geo.params_)},
        tree=TreeArrays(tree.parent_, tree.weight_, tree.leaf_of_token_, tree.params_),
    )
    return path, dict(token_bytes=token_bytes, vectors=vectors, trained=trained, borrowed=borrowed, counts=counts,
                      knn=knn, geo=geo, tree=tree)


@pytest.fixture
def store(written):
    return open_store(written[0])  # a fresh object per test: lazy caches start empty


def test_round_trip_of_every_array(store, written):
    _, given = written
    assert store.vocab_size == len(given["token_bytes"])
    assert store.token_bytes_list == given["token_bytes"]
    np.testing.assert_array_equal(store.counts, given["counts"])
    np.testing.assert_array_equal(store.trained, given["trained"])
    np.testing.assert_array_equal(store.borrowed_from, given["borrowed"])
    np.testing.assert_array_equal(store.embeddings(), given["vectors"])
    for name in ("knn", "geo"):
        fitted, op = given[name], store.operator("geodesic" if name == "geo" else name)
        np.testing.assert_array_equal(op.indices, fitted.indices_)
        np.testing.assert_array_equal(op.costs, fitted.costs_)
        assert op.cap == fitted.cap_ and op.fingerprint == "ab" * 32
    tree, fitted = store.tree(), given["tree"]
    np.testing.assert_array_equal(tree.parent, fitted.parent_)
    np.testing.assert_array_equal(tree.weight, fitted.weight_)
    np.testing.assert_array_equal(tree.leaf_of_token, fitted.leaf_of_token_)
    assert store.metrics == ["l2", "geodesic", "knn", "tree"]
    attrs = store.metric_attrs("geodesic")
    assert attrs["k"] == 12 and attrs["k_graph"] == 4 and attrs["cap"] == given["geo"].cap_
    info = store.info()
    assert info["tokenizer"]["spec"] == "test:tiny" and info["corpus"]["n_tokens"] == 123
    assert set(info["metrics"]) == {"l2", "geodesic", "knn", "tree"}
    index = store.faiss_index()
    assert index.ntotal == int(given["trained"].sum())


def test_queries_by_id_and_by_text(store, written):
    _, given = written
    knn = given["knn"].to_operator()
    by_id = store.neighbors(0, k=4, metric="knn")
    assert store.neighbors(" cat", k=4, metric="knn") == by_id
    assert [n.id for n in by_id] == knn.neighbors(0)[0][:4].tolist()
    assert [n.text for n in by_id] == [given["token_bytes"][n.id].decode("utf-8", "backslashreplace") for n in by_id]
    assert store.resolve("cat") == 1 and store.resolve(" cat") == 0 and store.resolve("\n") == 10
    assert store.cost(" cat", " dog", metric="l2") == pytest.approx(l2_distance(given["vectors"], 0, 3), abs=1e-6)
    assert store.cost(0, 3, metric="knn") == knn.cost(0, 3)
    assert store.cost(0, 3, metric="tree") == pytest.approx(given["tree"].to_tree().distance(0, 3))
    assert store.cost(" cat", " cat", metric="geodesic") == 0.0
    np.testing.assert_array_equal(store.embedding(" dog"), given["vectors"][3])
    # exact l2 neighbours over every usable token agree with brute force
    usable = np.flatnonzero(given["trained"])
    d = l2_distance(given["vectors"], 5, usable)
    want = usable[np.argsort(np.where(usable == 5, np.inf, d))][:5]
    assert [n.id for n in store.neighbors(" house", k=5, metric="l2")] == want.tolist()
    # the isolate policy: an untrained token has no neighbours and costs the cap (l2: 2)
    assert store.neighbors("Cat", metric="knn") == [] and store.neighbors("Cat", metric="l2") == []
    assert store.cost("Cat", " cat", metric="l2") == 2.0
    assert store.cost("Cat", " cat", metric="knn") == pytest.approx(given["knn"].cap_)
    assert store.neighbors(0, k=100, metric="knn") == store.neighbors(0, k=6, metric="knn")  # at most the stored k


def test_bad_tokens_and_metrics_give_clear_errors(store):
    with pytest.raises(TokenNotFound, match=r"no token has the text ' hous' in test:tiny") as e:
        store.resolve(" hous")
    assert "did you mean" not in str(e.value)
    with pytest.raises(TokenNotFound, match=r"'CAT'.*did you mean 'cat', ' cat', 'Cat'"):
        store.resolve("CAT")
    with pytest.raises(TokenNotFound, match=r"' dup' matches several ids: \[11, 12\]; pass the id"):
        store.neighbors(" dup")
    with pytest.raises(TokenizerError, match=r"token id 64 is out of range \[0, 64\)"):
        store.neighbors(64)
    with pytest.raises(TokenizerError, match="out of range"):
        store.cost(-1, 0)
    with pytest.raises(TokenizerError, match="a token is an id .* got float"):
        store.resolve(1.5)
    assert store.resolve("42") == 13  # the text wins over the id reading
    assert store.resolve("7") == 7  # an all-digit text that matches no token is an id
    with pytest.raises(StoreError, match="has no metric 'umap'; it has: l2, geodesic, knn, tree"):
        store.neighbors(0, metric="umap")
    with pytest.raises(StoreError, match="use store.tree"):
        store.operator("tree")
    with pytest.raises(StoreError, match="computed exactly on demand"):
        store.operator("l2")
    with pytest.raises(VocabMetricError, match="k must be >= 1"):
        store.neighbors(0, k=0)


def set_attr(path, key, value):
    """Change a root attribute and re-hash, as if the store had been written with it."""
    import zarr

    from vocabmetric.store.integrity import write_manifest

    zarr.open_group(str(path), mode="r+", zarr_format=3).attrs[key] = value
    write_manifest(path)


def test_unfinished_store_and_schema_mismatch_refuse_to_open(written, tmp_path):
    unfinished, other_schema = tmp_path / "unfinished.zarr", tmp_path / "v99.zarr"
    shutil.copytree(written[0], unfinished)
    shutil.copytree(written[0], other_schema)
    set_attr(unfinished, "complete", False)
    set_attr(other_schema, "schema_version", 99)
    with pytest.raises(StoreError, match=r"unfinished.zarr is an unfinished store .* rerun `vocabmetric build`"):
        open_store(unfinished)
    with pytest.raises(StoreError, match=r"schema version 99; this vocabmetric .* reads version 1"):
        open_store(other_schema)
    with pytest.raises(StoreError, match="is not a vocabmetric store"):
        open_store(tmp_path)
    (tmp_path / "run" / "metric.zarr").mkdir(parents=True)
    with pytest.raises(StoreError, match="open its metric.zarr"):
        open_store(tmp_path / "run")


def test_concurrent_queries_from_threads(written):
    fresh = open_store(written[0])  # nothing loaded yet: threads race on the lazy loads
    reference = open_store(written[0])
    jobs = [(i % 64, m) for i in range(400) for m in ("knn", "geodesic", "l2", "tree")][::3]
    want = [(reference.neighbors(i, k=5, metric=m), reference.cost(i, (i * 7) % 64, metric=m)) for i, m in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: (fresh.neighbors(job[0], k=5, metric=job[1]),
                                         fresh.cost(job[0], (job[0] * 7) % 64, metric=job[1])), jobs))
    assert got == want


def test_small_store_answers_by_text(small_store):
    """On the real pipeline's store: a frequent word with its leading space resolves and has
    neighbours under every truncated metric, cheapest first, below the cap."""
    i = small_store.resolve(" the")
    assert small_store.trained[i]
    for metric in ("knn", "geodesic", "umap", "l2", "tree"):
        nbrs = small_store.neighbors(" the", k=5, metric=metric)
        costs = [n.cost for n in nbrs]
        assert len(nbrs) == 5 and costs == sorted(costs) and i not in [n.id for n in nbrs]
        cap = small_store.metric_attrs(metric)["cap"]
        assert max(costs) <= cap
        assert small_store.cost(" the", nbrs[0].id, metric=metric) == pytest.approx(costs[0], rel=1e-6)
