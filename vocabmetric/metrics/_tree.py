"""Tree ground metrics over a vocabulary: hierarchical clusterings turned into TreeMetrics.

Two builders, same output (valid input to :class:`~vocabmetric.cost.TreeMetric`):

* :class:`TreeBuilder` — recursive k-means (faiss): split every cluster into ``branching``
  clusters until it holds at most ``max_leaf_size`` tokens or ``max_depth`` is reached;
  after each k-means, ``follow_knn`` rounds move every member to the group most of its
  10 nearest neighbours are in (:func:`follow_neighbors`), so that a cut runs where the kNN
  graph is thin and neighbours share a low ancestor. (Plain binary k-means over the demo
  store's 99.5k tokens split 20% of 10-NN pairs within the top three levels of each tree,
  at a median token depth of 17.)
* :class:`~vocabmetric.metrics.WardTreeBuilder` (:mod:`._tree_graph`) — Ward agglomerative
  clustering constrained to the symmetrized kNN graph: a binary tree built from the neighbours up.

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
from typing import Any

import numpy as np

from .._util.progress import progress_bar
from .._util.vectors import normalized
from ..errors import VocabMetricError
from ..cost import TreeEnsemble, TreeMetric
from ._checks import (CAP_PAIRS, CAP_QUANTILE, argument_where, check_cap, check_flag, check_inputs, check_integer, check_k,
                      random_pairs)
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


class _ShapedTree:
    """The shape settings of a tree builder whose weights are fitted (mixin)."""

    shape, shape_exponent, shape_fraction, shape_rank, fit_weights = "none", 1.0, 0.25, 10, True

    def tree_shape(self):
        """The :class:`~vocabmetric.metrics.CostShape` the weights are fitted through (None: plain l2)."""
        from ._shape import CostShape

        if self.shape == "none":
            return None
        self._shape = CostShape(self.shape, exponent=self.shape_exponent, fraction=self.shape_fraction,
                                rank=self.shape_rank)
        return self._shape


def check_tree_shape(builder: Any, where: str) -> None:
    """A tree's shape is valid, not ``"rank"``, and its weights are fitted (ConfigError naming it)."""
    from ..errors import ConfigError
    from ._shape import CostShape

    CostShape(builder.shape, exponent=builder.shape_exponent, fraction=builder.shape_fraction,
              rank=builder.shape_rank).validate(where)
    if builder.shape == "rank":
        raise ConfigError(f"{where} shape = 'rank' ranks a stored neighbour table; a tree's weights are fitted to "
                          "distances: use shape = 'fraction' or 'power'")
    if builder.shape != "none" and not builder.fit_weights:
        raise ConfigError(f"{where} shape = {builder.shape!r} shapes the fitted weights: set fit_weights = true")
    if builder.shape == "fraction" and builder.shape_rank > 10:
        raise ConfigError(f"{where} shape_rank = {builder.shape_rank}: the tree reads each token's 10 nearest; "
                          "use shape_rank <= 10")


def shape_params(fitted: dict) -> dict:
    """``{"shape": ...}`` for a tree's params when its weights were fitted through a shape."""
    return {"shape": fitted["shape"]} if fitted and "shape" in fitted else {}


class TreeBuilder(_ShapedTree, _TreeResult):
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
    shape, shape_exponent, shape_fraction, shape_rank
        Fit the weights to shaped l2 distances (:class:`~vocabmetric.metrics.CostShape`,
        ``"power"`` or ``"fraction"``; the cap is l2's, ``shape_rank`` ≤ 10): a tree whose
        neighbours cost a chosen share of a stranger. Needs ``fit_weights``.
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
                 fit_weights: bool = True, n_pairs: int | None = None, follow_knn: int = FOLLOW_ROUNDS,
                 shape: str = "none", shape_exponent: float = 1.0, shape_fraction: float = 0.25, shape_rank: int = 10):
        self.branching, self.max_leaf_size, self.max_depth, self.cap = branching, max_leaf_size, max_depth, cap
        self.n_trees, self.niter, self.seed, self.progress = n_trees, niter, seed, progress
        self.fit_weights, self.n_pairs, self.follow_knn = fit_weights, n_pairs, follow_knn
        self.shape, self.shape_exponent, self.shape_fraction, self.shape_rank = shape, shape_exponent, shape_fraction, shape_rank

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
        check_tree_shape(self, where)
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
                                                 argument_where(self, None), shape=self.tree_shape())
            forest = [(parent, weight) for (parent, _), weight in zip(forest, weights)]
        return self._finish(forest, root, trained_ids, untrained_ids, self.cap, self.seed,
                            builder="kmeans", branching=self.branching, max_leaf_size=self.max_leaf_size,
                            max_depth=self.max_depth, fit_weights=bool(self.fit_weights), follow_knn=self.follow_knn,
                            **({"weight_fit": fitted} if fitted else {}), **shape_params(fitted))

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


class TreeRefit(_ShapedTree, _TreeResult):
    """New edge weights for grown trees (a store's, say), their topology kept: the joint fit
    of :class:`TreeBuilder` (``fit_weights``), optionally through a cost shape.

    Parameters
    ----------
    cap, seed, n_pairs, shape, shape_exponent, shape_fraction, shape_rank
        As :class:`TreeBuilder`'s.

    ``fit(embeddings, trained, trees=..., knn=None)``: ``trees`` a
    :class:`~vocabmetric.cost.TreeMetric`, a :class:`~vocabmetric.cost.TreeEnsemble`
    or a list of TreeMetrics over the same vocabulary with token i = node i and one root id
    shared by all (TreeBuilder's trees: root = V; a Ward tree alone). The fit's ridge pulls
    toward the trees' current weights (TreeBuilder's: toward the centroid distances), so a
    refit without a shape moves a fitted tree only a little. Cost: the weight fit's,
    O(n_pairs·T·depth) plus ≤ 200 LSMR steps; no tree is grown.

    Example: ``TreeRefit(shape="fraction", shape_fraction=0.2).fit(emb, usable, trees=store.tree())``.
    """

    fit_weights = True

    def __init__(self, cap: float | None = None, *, seed: int = 0, n_pairs: int | None = None, shape: str = "none",
                 shape_exponent: float = 1.0, shape_fraction: float = 0.25, shape_rank: int = 10):
        self.cap, self.seed, self.n_pairs = cap, seed, n_pairs
        self.shape, self.shape_exponent, self.shape_fraction, self.shape_rank = shape, shape_exponent, shape_fraction, shape_rank

    def validate(self, where: str | None = None) -> "TreeRefit":
        """Check every argument (ConfigError naming it)."""
        where = argument_where(self, where)
        check_integer(where, "seed", self.seed, 0)
        check_integer(where, "n_pairs", self.n_pairs, 1, unset=True)
        check_cap(where, self.cap)
        check_tree_shape(self, where)
        return self

    def fit(self, embeddings: Any, trained: Any = None, *, trees: Any, knn: Any = None) -> "TreeRefit":
        what = type(self).__name__
        self.validate()
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids, untrained_ids = np.flatnonzero(mask), np.flatnonzero(~mask)
        trees = list(getattr(trees, "trees", [trees]) if not isinstance(trees, (list, tuple)) else trees)
        roots = {int(np.flatnonzero(np.asarray(t.parent) < 0)[0]) for t in trees}
        if len(roots) != 1 or any(t.vocab_size != len(emb) for t in trees):
            raise VocabMetricError(f"{what}: the trees must share one root and the embeddings' {len(emb)} tokens; "
                                   f"got roots {sorted(roots)[:4]}")
        n_pairs = min(FIT_PAIRS, distinct_pairs(len(trained_ids))) if self.n_pairs is None else self.n_pairs
        check_sample_size(len(trained_ids), n_pairs, argument_where(self, None))
        near = nearest_indices(emb, mask, knn)
        forest = [(np.asarray(t.parent, np.int64).copy(), np.asarray(t.weight, np.float64).copy()) for t in trees]
        (root,) = roots
        weights, fitted = fit_forest_weights(forest, root, trained_ids, emb, near, n_pairs, self.seed,
                                             argument_where(self, None), shape=self.tree_shape())
        forest = [(parent, weight) for (parent, _), weight in zip(forest, weights)]
        return self._finish(forest, root, trained_ids, untrained_ids, self.cap, self.seed, builder="refit",
                            weight_fit=fitted, **shape_params(fitted))
