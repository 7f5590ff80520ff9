"""Tree ground metrics over a vocabulary: hierarchical clusterings turned into TreeMetrics.

Two builders, same output (valid input to :class:`~vocabmetric.operator.TreeMetric`):

* :class:`TreeBuilder` — recursive k-means (faiss): split every cluster into ``branching``
  clusters until it holds at most ``max_leaf_size`` tokens or ``max_depth`` is reached.
* :class:`WardTreeBuilder` — scikit-learn's Ward agglomerative clustering constrained to
  the symmetrized kNN graph; a binary tree.

Both work on the unit vectors (as the l2 metric does). The length of the edge from a node
up to its parent is the distance between their centroids (a token's "centroid" is its own
unit vector), floored at ``MIN_EDGE`` so distinct tokens are at distance > 0.

Node ids: token i is node i (``leaf_of_token_ = arange(V)``), internal nodes follow from
V on. Untrained tokens hang directly under the root by an edge of ``cap_ / 2``, so the
distance from one to any trained token is ``cap_/2 + (root distance of that token)`` and
between two untrained tokens it is ``cap_``. ``cap_`` is the 99th percentile of the tree
distance over random trained pairs (or given).

Example
-------
>>> tree = TreeBuilder(branching=16, max_leaf_size=16).fit(embeddings, trained).to_tree()
>>> tree.distance(17, 42)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from .._progress import progress_bar
from .._vectors import normalized
from ..errors import VocabMetricError
from ..operator import TreeMetric
from ._checks import (CAP_PAIRS, CAP_QUANTILE, argument_where, check_cap, check_flag, check_inputs, check_integer, check_k,
                      check_knn, random_pairs)
from ._knn import KnnMetric, knn_graph
from ._tree_fit import fit_tree_weights

LOG = logging.getLogger(__name__)

#: Shortest edge in a tree; keeps distinct tokens (even duplicate vectors) apart.
MIN_EDGE = 1e-6


class _TreeResult:
    parent_: np.ndarray
    weight_: np.ndarray
    leaf_of_token_: np.ndarray
    cap_: float
    params_: dict

    def to_tree(self, fingerprint: str | None = None) -> TreeMetric:
        """The fitted tree as a :class:`TreeMetric`."""
        if not hasattr(self, "parent_"):
            raise VocabMetricError(f"{type(self).__name__} is not fitted; call fit(embeddings, trained) first")
        return TreeMetric(self.parent_, self.weight_, self.leaf_of_token_, fingerprint)

    def _finish(self, parent: np.ndarray, weight: np.ndarray, root: int, trained_ids: np.ndarray,
                untrained_ids: np.ndarray, cap: float | None, seed: int, **params: Any):
        """Hang untrained tokens under the root at cap/2; set the fitted attributes."""
        what = type(self).__name__
        weight = np.maximum(weight, MIN_EDGE)
        parent[root], weight[root] = -1, 0.0
        parent[untrained_ids] = root
        vocab_size = len(trained_ids) + len(untrained_ids)
        tree = TreeMetric(parent, weight, np.arange(vocab_size))
        if cap is None:
            a, b = random_pairs(trained_ids, CAP_PAIRS, seed)
            cap, statistic = float(np.quantile(tree.distance(a, b), CAP_QUANTILE)), f"p{CAP_QUANTILE * 100:g} of {len(a)} random trained pairs"
        else:  # checked by validate()
            cap, statistic = float(cap), "given"
        weight[untrained_ids] = cap / 2
        self.parent_, self.weight_ = parent.astype(np.int64), weight.astype(np.float64)
        self.leaf_of_token_ = np.arange(vocab_size, dtype=np.int64)
        self.cap_ = cap
        depth = int(tree.depth.max())
        self.params_ = {"kind": "tree", "cap": cap, "cap_statistic": statistic, "n_nodes": len(parent),
                        "depth": depth, "untrained": "under the root at cap/2", **params}
        LOG.info("%s: V=%d n_nodes=%d depth=%d cap=%.4g", what, vocab_size, len(parent), depth, cap)
        return self


class TreeBuilder(_TreeResult):
    """Recursive k-means tree (faiss).

    Parameters
    ----------
    branching : int
        Clusters per split (fewer when a cluster has fewer tokens or k-means leaves some
        empty).
    max_leaf_size : int
        A cluster of at most this many tokens is not split: its tokens become its children.
    max_depth : int
        No split below this depth.
    niter : int
        k-means iterations per split.
    cap, seed, progress
        Fixed cap (default: p99 of random trained pairs), k-means seed, progress bar.
    fit_weights : bool
        Refit the edge lengths to the l2 distances of ``n_pairs`` sampled trained pairs,
        half of them 10-NN pairs (:mod:`._tree_fit`); off by default: on the demo store it
        lowered Spearman(tree, l2) (0.56 → 0.52 at branching 16; 0.67 → 0.67 at 2).
    n_pairs : int
        Pairs of that fit (a sample larger than the trained tokens' distinct pairs is a
        ConfigError naming it).

    Cost: one k-means over every level's tokens, O(V·branching·d·niter·depth) in all;
    memory O(V·d). ``fit`` uses ``knn=`` (indices, costs) only for the near pairs of the
    weight fit (an exact 10-NN search when None).
    """

    def __init__(self, branching: int = 16, max_leaf_size: int = 16, max_depth: int = 32, cap: float | None = None, *,
                 niter: int = 20, seed: int = 0, progress: bool | None = None, fit_weights: bool = False,
                 n_pairs: int = 100_000):
        self.branching, self.max_leaf_size, self.max_depth, self.cap = branching, max_leaf_size, max_depth, cap
        self.niter, self.seed, self.progress = niter, seed, progress
        self.fit_weights, self.n_pairs = fit_weights, n_pairs

    def validate(self, where: str | None = None) -> "TreeBuilder":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.tree]"``; default: the class name).
        """
        where = argument_where(self, where)
        for name, low in (("branching", 2), ("max_leaf_size", 1), ("max_depth", 0), ("niter", 1), ("seed", 0),
                          ("n_pairs", 1)):
            check_integer(where, name, getattr(self, name), low)
        check_cap(where, self.cap)
        check_flag(where, "progress", self.progress)
        check_flag(where, "fit_weights", self.fit_weights)
        return self

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "TreeBuilder":
        what = type(self).__name__
        self.validate()
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids, untrained_ids = np.flatnonzero(mask), np.flatnonzero(~mask)
        check_k(1, len(trained_ids), what, "the tree's 1 neighbour")
        unit = normalized(emb)[trained_ids]
        vocab_size = len(emb)
        parent = [np.full(vocab_size + 1, -1, dtype=np.int64)]
        weight = [np.zeros(vocab_size + 1, dtype=np.float64)]
        root = vocab_size
        n_nodes = vocab_size + 1
        pending = [(root, np.arange(len(trained_ids)), unit.astype(np.float64).mean(0), 0)]
        bar = progress_bar(None, self.progress, total=len(trained_ids), desc="k-means tree", unit="token")
        new_parent, new_weight = [], []  # internal nodes beyond the first V+1
        while pending:
            node, members, centroid, depth = pending.pop()
            groups = self._split(unit[members]) if len(members) > self.max_leaf_size and depth < self.max_depth else []
            if len(groups) < 2:  # a leaf cluster: its tokens hang under it
                tokens = trained_ids[members]
                parent[0][tokens] = node
                weight[0][tokens] = np.linalg.norm(unit[members].astype(np.float64) - centroid, axis=1)
                bar.update(len(members))
                continue
            for group in groups:
                sub = members[group]
                if len(sub) == 1:  # a singleton is the token itself
                    parent[0][trained_ids[sub[0]]] = node
                    weight[0][trained_ids[sub[0]]] = np.linalg.norm(unit[sub[0]].astype(np.float64) - centroid)
                    bar.update(1)
                    continue
                child_centroid = unit[sub].astype(np.float64).mean(0)
                new_parent.append(node)
                new_weight.append(np.linalg.norm(child_centroid - centroid))
                pending.append((n_nodes, sub, child_centroid, depth + 1))
                n_nodes += 1
        bar.close()
        parent_all = np.concatenate([parent[0], np.asarray(new_parent, dtype=np.int64)])
        weight_all = np.concatenate([weight[0], np.asarray(new_weight, dtype=np.float64)])
        fitted = {}
        if self.fit_weights:
            weight_all, fitted = fit_tree_weights(parent_all, weight_all, root, trained_ids, emb, knn, self.n_pairs,
                                                  self.seed, argument_where(self, None))
        return self._finish(parent_all, weight_all, root, trained_ids, untrained_ids, self.cap, self.seed,
                            builder="kmeans", branching=self.branching, max_leaf_size=self.max_leaf_size,
                            max_depth=self.max_depth, fit_weights=bool(self.fit_weights),
                            **({"weight_fit": fitted} if fitted else {}))

    def _split(self, points: np.ndarray) -> list[np.ndarray]:
        """k-means of ``points`` into at most ``branching`` groups: non-empty index arrays."""
        import faiss

        n_clusters = min(self.branching, len(points))
        kmeans = faiss.Kmeans(points.shape[1], n_clusters, niter=self.niter, seed=self.seed, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=256)
        kmeans.train(np.ascontiguousarray(points))
        _, labels = kmeans.index.search(points, 1)
        labels = labels[:, 0]
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        return [g for g in np.split(order, bounds) if len(g)]


class WardTreeBuilder(_TreeResult):
    """Ward agglomerative clustering constrained to the symmetrized kNN graph (scikit-learn).

    Parameters
    ----------
    n_neighbors : int
        Degree of the kNN connectivity graph (before symmetrization).
    cap, seed, progress
        Fixed cap (default: p99 of random trained pairs), seed of those pairs, progress bar
        of the kNN search when none is given.

    The merge tree is binary (``2·n_trained − 1`` nodes for the trained tokens). When the
    graph has several components, scikit-learn joins them (with a warning, silenced here)
    before merging. Cost: scikit-learn's ``ward_tree`` on a sparse graph, O(V·deg·log V).
    """

    def __init__(self, n_neighbors: int = 10, cap: float | None = None, *, seed: int = 0, progress: bool | None = None):
        self.n_neighbors, self.cap, self.seed, self.progress = n_neighbors, cap, seed, progress

    def validate(self, where: str | None = None) -> "WardTreeBuilder":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.tree]"``; default: the class name).
        """
        where = argument_where(self, where)
        check_integer(where, "n_neighbors", self.n_neighbors, 1)
        check_integer(where, "seed", self.seed, 0)
        check_cap(where, self.cap)
        check_flag(where, "progress", self.progress)
        return self

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "WardTreeBuilder":
        from scipy.sparse import csr_matrix
        from sklearn.cluster import AgglomerativeClustering

        what = type(self).__name__
        self.validate()
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids, untrained_ids = np.flatnonzero(mask), np.flatnonzero(~mask)
        n_t, vocab_size = len(trained_ids), len(emb)
        n_nb = check_k(self.n_neighbors, n_t, what, "n_neighbors")
        if knn is None:
            base = KnnMetric(n_nb, progress=self.progress).fit(emb, mask)
            knn = (base.indices_, base.costs_)
        knn_idx, knn_dist = check_knn(knn, vocab_size, n_nb, what)
        position = np.full(vocab_size, -1, dtype=np.int64)
        position[trained_ids] = np.arange(n_t)
        sub_idx = np.where(knn_idx[trained_ids] >= 0, position[np.maximum(knn_idx[trained_ids], 0)], -1)
        indptr, nbr, _ = knn_graph(sub_idx, knn_dist[trained_ids], n_t)
        connectivity = csr_matrix((np.ones(len(nbr)), nbr, indptr), shape=(n_t, n_t))
        unit = normalized(emb)[trained_ids].astype(np.float64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*connected components.*")
            ward = AgglomerativeClustering(n_clusters=1, linkage="ward", connectivity=connectivity,
                                           compute_full_tree=True).fit(unit)
        children = ward.children_  # merge i makes node n_t + i from two earlier nodes
        n_merged = 2 * n_t - 1
        centroid = np.empty((n_merged, unit.shape[1]))
        size = np.ones(n_merged)
        centroid[:n_t] = unit
        up = np.full(n_merged, -1, dtype=np.int64)
        for i, (a, b) in enumerate(children):
            node = n_t + i
            size[node] = size[a] + size[b]
            centroid[node] = (size[a] * centroid[a] + size[b] * centroid[b]) / size[node]
            up[a] = up[b] = node
        edge = np.zeros(n_merged)
        has_up = up >= 0
        edge[has_up] = np.linalg.norm(centroid[has_up] - centroid[up[has_up]], axis=1)
        # renumber: trained position p -> token trained_ids[p]; merge node n_t+i -> vocab_size+i
        node_id = np.concatenate([trained_ids, vocab_size + np.arange(n_t - 1)])
        parent = np.full(vocab_size + n_t - 1, -1, dtype=np.int64)
        weight = np.zeros(vocab_size + n_t - 1)
        parent[node_id[has_up]] = node_id[up[has_up]]
        weight[node_id] = edge
        root = int(node_id[-1]) if n_t > 1 else int(trained_ids[0])
        return self._finish(parent, weight, root, trained_ids, untrained_ids, self.cap, self.seed,
                            builder="ward", n_neighbors=n_nb)
