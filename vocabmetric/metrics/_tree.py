"""Tree ground metrics over a vocabulary: hierarchical clusterings turned into TreeMetrics.

Two builders, same output (valid input to :class:`~vocabmetric.cost.TreeMetric`):

* :class:`TreeBuilder` — recursive k-means (faiss): split every cluster into ``branching``
  clusters until it holds at most ``max_leaf_size`` tokens or ``max_depth`` is reached;
  after each k-means, ``follow_knn`` rounds move every member to the group most of its
  10 nearest neighbours are in (:func:`follow_neighbors`), so that a cut runs where the kNN
  graph is thin and neighbours share a low ancestor. (Plain binary k-means over the demo
  store's 99.5k tokens split 20% of 10-NN pairs within the top three levels of each tree,
  at a median token depth of 17.)
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

``TreeBuilder(n_trees=T)`` grows T trees from seeds ``seed … seed+T−1``; the metric is their
mean distance (``to_tree()`` a :class:`~vocabmetric.cost.TreeEnsemble`; ``trees_`` the
trees; ``parent_``, ``weight_``, ``leaf_of_token_`` (T, V), ``offsets_`` the stacked arrays
the store keeps). With one tree the arrays are those of the tree itself.

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

from .._util.progress import progress_bar
from .._util.vectors import normalized
from ..errors import VocabMetricError
from ..cost import TreeEnsemble, TreeMetric
from ._checks import (CAP_PAIRS, CAP_QUANTILE, argument_where, check_cap, check_flag, check_inputs, check_integer, check_k,
                      check_knn, random_pairs)
from ._knn import KnnMetric, knn_graph
from ._tree_fit import check_sample_size, distinct_pairs, fit_forest_weights, nearest_indices

LOG = logging.getLogger(__name__)

#: Shortest edge in a tree; keeps distinct tokens (even duplicate vectors) apart.
MIN_EDGE = 1e-6
#: Sampled pairs of the default weight fit.
FIT_PAIRS = 100_000
#: Default rounds of moving split members to their nearest neighbours' side (``follow_knn``).
FOLLOW_ROUNDS = 10


class _TreeResult:
    parent_: np.ndarray
    weight_: np.ndarray
    leaf_of_token_: np.ndarray
    offsets_: np.ndarray
    trees_: list
    cap_: float
    params_: dict

    def to_tree(self, fingerprint: str | None = None) -> TreeMetric | TreeEnsemble:
        """The fitted tree as a :class:`TreeMetric`, or its trees as a :class:`TreeEnsemble`."""
        trees = self.to_trees(fingerprint)
        return trees[0] if len(trees) == 1 else TreeEnsemble(trees, fingerprint)

    def to_trees(self, fingerprint: str | None = None) -> list[TreeMetric]:
        """Every fitted tree, a :class:`TreeMetric` each."""
        if not hasattr(self, "trees_"):
            raise VocabMetricError(f"{type(self).__name__} is not fitted; call fit(embeddings, trained) first")
        return [TreeMetric(t.parent, t.weight, t.leaf_of_token, fingerprint) for t in self.trees_]

    def _finish(self, forest: list[tuple[np.ndarray, np.ndarray]], root: int, trained_ids: np.ndarray,
                untrained_ids: np.ndarray, cap: float | None, seed: int, **params: Any):
        """Hang untrained tokens under each root at cap/2 (cap of the mean distance); set the
        fitted attributes. ``forest``: ``(parent, weight)`` per tree, all rooted at ``root``."""
        what = type(self).__name__
        vocab_size = len(trained_ids) + len(untrained_ids)
        trees = []
        for parent, weight in forest:
            weight = np.maximum(weight, MIN_EDGE)
            parent[root], weight[root] = -1, 0.0
            parent[untrained_ids] = root
            trees.append(TreeMetric(parent.astype(np.int64), weight.astype(np.float64), np.arange(vocab_size)))
        if cap is None:
            a, b = random_pairs(trained_ids, CAP_PAIRS, seed)
            mean = TreeEnsemble(trees).distance(a, b)
            cap, statistic = float(np.quantile(mean, CAP_QUANTILE)), f"p{CAP_QUANTILE * 100:g} of {len(a)} random trained pairs"
        else:  # checked by validate()
            cap, statistic = float(cap), "given"
        for tree in trees:
            tree.weight[untrained_ids] = cap / 2
        self.trees_ = [TreeMetric(t.parent, t.weight, t.leaf_of_token) for t in trees]  # root distances with the cap
        stacked = TreeEnsemble(self.trees_)
        single = len(trees) == 1
        self.parent_, self.weight_, self.offsets_ = stacked.parent, stacked.weight, stacked.offsets
        self.leaf_of_token_ = self.trees_[0].leaf_of_token.copy() if single else stacked.leaf_of_token
        self.cap_ = cap
        depth = max(int(t.depth.max()) for t in self.trees_)
        self.params_ = {"kind": "tree", "cap": cap, "cap_statistic": statistic, "n_nodes": len(self.parent_),
                        "depth": depth, "n_trees": len(trees), "untrained": "under the root at cap/2", **params}
        LOG.info("%s: V=%d trees=%d n_nodes=%d depth=%d cap=%.4g", what, vocab_size, len(trees), len(self.parent_),
                 depth, cap)
        return self


class TreeBuilder(_TreeResult):
    """Recursive k-means trees (faiss); ``n_trees`` of them, averaged.

    Parameters
    ----------
    branching : int
        Clusters per split (fewer when a cluster has fewer tokens or k-means leaves some
        empty).
    max_leaf_size : int
        A cluster of at most this many tokens is not split: its tokens become its children.
    max_depth : int
        No split below this depth.
    n_trees : int
        Trees to build, tree t with k-means seed ``seed + t``; the metric is their mean
        distance (:class:`~vocabmetric.cost.TreeEnsemble`), the cap that mean's p99.
        The defaults (4 binary trees following the kNN graph, fitted) on the demo store's
        99.5k usable tokens (``benchmarks/tree_fidelity.py``): Spearman(tree, l2) 0.848 over
        random usable pairs, 10-NN/median contrast 0.309 (l2: 0.291, 6% above; plain
        k-means splits: 0.889 and 0.364, 25% above), built in 68 s. Eight such trees:
        0.861 and 0.314, built in 118 s, and twice the penalty's cost (it is O(T·V) per
        position: ``benchmarks/tree_cost.py``).
    niter : int
        k-means iterations per split.
    cap, seed, progress
        Fixed cap (default: p99 of random trained pairs), k-means seed, progress bar.
    fit_weights : bool
        Refit the edge lengths of all trees jointly, so that their mean distance fits the l2
        distances of ``n_pairs`` sampled trained pairs, half of them 10-NN pairs
        (:mod:`._tree_fit`).
    follow_knn : int
        Rounds of moving the members of each split to the side of their 10 nearest trained
        neighbours (0: plain k-means splits); see :func:`follow_neighbors`. Costs one
        10-NN search (shared with the weight fit; ``knn=`` when given) and O(rounds·V·10)
        per tree level.
    n_pairs : int, optional
        Pairs of that fit; default :data:`FIT_PAIRS`, or every distinct trained pair where
        there are fewer. A given sample larger than the trained tokens' distinct pairs is a
        ConfigError naming it.

    Cost: per tree, one k-means over every level's tokens, O(V·branching·d·niter·depth) in
    all; memory O(V·d + n_trees·V). ``fit`` uses ``knn=`` (indices, costs) only for the near
    pairs of the weight fit (an exact 10-NN search when None).
    """

    def __init__(self, branching: int = 2, max_leaf_size: int = 16, max_depth: int = 32, cap: float | None = None, *,
                 n_trees: int = 4, niter: int = 20, seed: int = 0, progress: bool | None = None,
                 fit_weights: bool = True, n_pairs: int | None = None, follow_knn: int = FOLLOW_ROUNDS):
        self.branching, self.max_leaf_size, self.max_depth, self.cap = branching, max_leaf_size, max_depth, cap
        self.n_trees, self.niter, self.seed, self.progress = n_trees, niter, seed, progress
        self.fit_weights, self.n_pairs, self.follow_knn = fit_weights, n_pairs, follow_knn

    def validate(self, where: str | None = None) -> "TreeBuilder":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.tree]"``; default: the class name).
        """
        where = argument_where(self, where)
        for name, low in (("branching", 2), ("max_leaf_size", 1), ("max_depth", 0), ("n_trees", 1), ("niter", 1),
                          ("seed", 0), ("n_pairs", 1), ("follow_knn", 0)):
            if not (name == "n_pairs" and self.n_pairs is None):
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
        n_pairs = self.n_pairs
        if self.fit_weights:  # before the trees are grown: a sample that cannot be drawn fails at once
            n_pairs = min(FIT_PAIRS, distinct_pairs(len(trained_ids))) if n_pairs is None else n_pairs
            check_sample_size(len(trained_ids), n_pairs, argument_where(self, None))
        unit = normalized(emb)[trained_ids]
        root = len(emb)
        near = nearest_indices(emb, mask, knn) if self.fit_weights or self.follow_knn else None
        neighbors = _positions(near, trained_ids, len(emb)) if self.follow_knn else None
        bar = progress_bar(None, self.progress, total=len(trained_ids) * self.n_trees, desc="k-means trees", unit="token")
        forest = [self._grow(unit, trained_ids, len(emb), self.seed + t, bar, neighbors) for t in range(self.n_trees)]
        bar.close()
        fitted = {}
        if self.fit_weights:
            weights, fitted = fit_forest_weights(forest, root, trained_ids, emb, near, n_pairs, self.seed,
                                                 argument_where(self, None))
            forest = [(parent, weight) for (parent, _), weight in zip(forest, weights)]
        return self._finish(forest, root, trained_ids, untrained_ids, self.cap, self.seed,
                            builder="kmeans", branching=self.branching, max_leaf_size=self.max_leaf_size,
                            max_depth=self.max_depth, fit_weights=bool(self.fit_weights), follow_knn=self.follow_knn,
                            **({"weight_fit": fitted} if fitted else {}))

    def _grow(self, unit: np.ndarray, trained_ids: np.ndarray, vocab_size: int, seed: int,
              bar: Any, neighbors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One k-means tree over the trained tokens' unit vectors: ``(parent, weight)``,
        token i = node i, root = node ``vocab_size``, internal nodes after it."""
        parent = np.full(vocab_size + 1, -1, dtype=np.int64)
        weight = np.zeros(vocab_size + 1, dtype=np.float64)
        root = n_nodes = vocab_size
        n_nodes += 1
        pending = [(root, np.arange(len(trained_ids)), unit.astype(np.float64).mean(0), 0)]
        side = np.full(len(trained_ids) + 1, -1, dtype=np.int64)  # scratch: a member's group at a split, -1 elsewhere
        new_parent, new_weight = [], []  # internal nodes beyond the first V+1
        while pending:
            node, members, centroid, depth = pending.pop()
            groups = (self._split(unit[members], seed, members, neighbors, side)
                      if len(members) > self.max_leaf_size and depth < self.max_depth else [])
            if len(groups) < 2:  # a leaf cluster: its tokens hang under it
                tokens = trained_ids[members]
                parent[tokens] = node
                weight[tokens] = np.linalg.norm(unit[members].astype(np.float64) - centroid, axis=1)
                bar.update(len(members))
                continue
            for group in groups:
                sub = members[group]
                if len(sub) == 1:  # a singleton is the token itself
                    parent[trained_ids[sub[0]]] = node
                    weight[trained_ids[sub[0]]] = np.linalg.norm(unit[sub[0]].astype(np.float64) - centroid)
                    bar.update(1)
                    continue
                child_centroid = unit[sub].astype(np.float64).mean(0)
                new_parent.append(node)
                new_weight.append(np.linalg.norm(child_centroid - centroid))
                pending.append((n_nodes, sub, child_centroid, depth + 1))
                n_nodes += 1
        return (np.concatenate([parent, np.asarray(new_parent, dtype=np.int64)]),
                np.concatenate([weight, np.asarray(new_weight, dtype=np.float64)]))

    def _split(self, points: np.ndarray, seed: int, members: np.ndarray | None = None,
               neighbors: np.ndarray | None = None, side: np.ndarray | None = None) -> list[np.ndarray]:
        """k-means of ``points`` into at most ``branching`` groups: non-empty index arrays."""
        import faiss

        n_clusters = min(self.branching, len(points))
        kmeans = faiss.Kmeans(points.shape[1], n_clusters, niter=self.niter, seed=seed, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=256)
        kmeans.train(np.ascontiguousarray(points))
        _, labels = kmeans.index.search(points, 1)
        labels = labels[:, 0]
        if neighbors is not None and self.follow_knn and n_clusters > 1:
            labels = follow_neighbors(labels, members, neighbors, side, self.follow_knn, n_clusters)
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        return [g for g in np.split(order, bounds) if len(g)]


def _positions(near: np.ndarray, trained_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """(n_trained, k) positions in ``trained_ids`` of each trained token's neighbours in
    ``near`` (V, k) token ids; -1, untrained or self entries become ``n_trained`` (padding)."""
    n_t = len(trained_ids)
    position = np.full(vocab_size + 1, n_t, dtype=np.int64)  # index -1 (empty) reads the last entry: padding
    position[trained_ids] = np.arange(n_t)
    found = position[near[trained_ids]]
    return np.where(found == np.arange(n_t)[:, None], n_t, found)


def follow_neighbors(labels: np.ndarray, members: np.ndarray, neighbors: np.ndarray, side: np.ndarray, rounds: int,
                     n_groups: int) -> np.ndarray:
    """Move each member of a split to the group most of its nearest neighbours are in.

    ``labels`` (m,): the k-means group of each member; ``members`` (m,): their positions;
    ``neighbors`` (n, k): each position's nearest neighbours' positions (``n`` = -1 padding:
    ``side[n]`` stays -1); ``side`` (n + 1,) scratch, all -1 on entry and on exit. Each round,
    a member takes the group holding most of its neighbours that are members (its own group
    wins ties and members with none keep theirs). A round that would empty a group is not
    taken. Cost: O(rounds·m·k).
    """
    nb = neighbors[members]
    own = np.arange(len(members))
    cell = own[:, None] * (n_groups + 1)  # votes[m, g] at m·(n_groups+1) + g; column n_groups: outside
    for _ in range(rounds):
        side[members] = labels
        got = side[nb]
        votes = np.bincount((cell + np.where(got >= 0, got, n_groups)).ravel(), minlength=len(members) * (n_groups + 1))
        votes = votes.reshape(len(members), n_groups + 1)[:, :n_groups] + 0.0
        votes[own, labels] += 0.5
        moved = votes.argmax(1)
        if np.array_equal(moved, labels) or len(np.unique(moved)) < len(np.unique(labels)):
            break
        labels = moved
    side[members] = -1
    return labels


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
        return self._finish([(parent, weight)], root, trained_ids, untrained_ids, self.cap, self.seed,
                            builder="ward", n_neighbors=n_nb)
