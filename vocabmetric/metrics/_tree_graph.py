"""A tree built from the neighbours up: Ward agglomeration constrained to the kNN graph.

:class:`TreeBuilder` splits from the top, by k-means in hundreds of dimensions, and then
moves split members toward their neighbours (``follow_knn``); on real model embeddings,
where every distance is alike, the top splits still cut through neighbourhoods.
:class:`WardTreeBuilder` merges from the bottom instead: scikit-learn's Ward agglomerative
clustering on the unit vectors, where only tokens joined by an edge of the symmetrized
kNN graph (:func:`~vocabmetric.metrics.knn_graph`) may merge, so every merge joins
neighbours and a token's first ancestors are its nearest tokens' too.

Edge lengths start as the distance between a node's centroid and its parent's (floored at
``MIN_EDGE``) and are then fitted (``fit_weights``, the default) like TreeBuilder's: least
squares on the (optionally shaped) l2 distances of sampled pairs, half of them each
sampled token with one of its 10 nearest (:mod:`._tree_fit`), so near pairs weigh as much
as the random ones that set the scale.

Several components. A kNN graph can fall apart (a cluster of tokens whose nearest are all
each other, such as byte tokens or one script's characters). Ward cannot merge across
components, so they are joined first, by scikit-learn's ``_fix_connectivity``: for each
pair of components, an edge between their two closest tokens. The builder says so in a
:class:`UserWarning` naming the number of components and the setting (``n_neighbors``) that
would join them through the graph instead, and records ``components`` in ``params_``.

Several trees (``n_trees`` = T > 1). Tree t merges on a random share (``subspace``, half by
default) of the coordinates, drawn with seed + t, over the same kNN graph; the T trees share
their node numbering (each has 2·n_trained − 1 nodes, the root last), so their edge lengths
are fitted jointly, as :class:`TreeBuilder`'s are, to make their *mean* distance fit l2. On
SmolLM2's embeddings (docs/results.md, "Contrast and price") two trees raise the tree's
WordSim353 from 0.68× to 0.79× l2's and its Spearman with l2 from 0.66 to 0.72, at twice the
build and about 1.2× the Tree-Wasserstein time; four add little more for twice that again.

Cost: the kNN search when none is given (O(V²·d) flat faiss), scikit-learn's
``ward_tree`` on the sparse graph (O(V·deg·log V) merges, each updating its neighbours'
Ward distances in O(d)), joining c components O(c·V·d), and the weight fit (O(n_pairs·depth)
plus ≤ 200 LSMR steps), the merges T times. One binary tree: ``2·n_trained − 1`` nodes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .._util.vectors import normalized
from ..errors import ConfigError, VocabMetricError
from ._checks import argument_where, check_cap, check_flag, check_inputs, check_integer, check_k, check_knn
from ._knn import KnnMetric, knn_graph
from ._tree import FIT_PAIRS, _ShapedTree, _TreeResult, check_tree_shape, shape_params
from ._tree_fit import check_sample_size, distinct_pairs, fit_forest_weights

#: Merge criteria (scikit-learn's): ``"ward"`` merges the pair of adjacent clusters whose union
#: least raises the within-cluster variance; ``"average"`` the pair with the smallest mean
#: length of the graph edges between them (UPGMA restricted to the graph).
LINKAGES = ("ward", "average")


class WardTreeBuilder(_ShapedTree, _TreeResult):
    """Ward agglomerative clustering constrained to the symmetrized kNN graph (scikit-learn).

    Parameters
    ----------
    n_neighbors : int
        Degree of the kNN connectivity graph (before symmetrization).
    cap, seed, progress
        Fixed cap (default: p99 of random trained pairs), seed of those pairs and of the
        weight fit's sample, progress bar of the kNN search when none is given.
    fit_weights : bool
        Fit the edge lengths to sampled l2 distances, half of them 10-NN pairs (default);
        false keeps the centroid distances.
    n_pairs : int, optional
        Pairs of that fit (default ``FIT_PAIRS`` or every distinct trained pair).
    linkage : {"ward", "average"}
        The merge criterion (:data:`LINKAGES`).
    top_size : int, optional
        Keep the graph-constrained merges only below clusters of at most this many tokens and
        join those clusters by an unconstrained Ward clustering of their centroids
        (:func:`rebuild_top`): the graph decides who is near, the full distances decide
        how the far clusters nest. None: the graph all the way up.
    shape, shape_exponent, shape_fraction, shape_rank
        Fit the weights to shaped l2 distances (see :class:`~vocabmetric.metrics.TreeBuilder`).
    n_trees : int
        Trees averaged (default 1). Above 1, tree t merges on a random ``subspace`` share of
        the coordinates (seed + t) and the weights are fitted jointly (the module docstring).
    subspace : float
        The share of coordinates each of several trees merges on, in (0, 1].

    ``fit(..., knn=(indices, costs))`` reuses a flat kNN table (at least ``n_neighbors`` and
    10 columns). See the module docstring for how several graph components are joined.
    """

    def __init__(self, n_neighbors: int = 10, cap: float | None = None, *, seed: int = 0, progress: bool | None = None,
                 fit_weights: bool = True, n_pairs: int | None = None, shape: str = "none",
                 shape_exponent: float = 1.0, shape_fraction: float = 0.25, shape_rank: int = 10, linkage: str = "ward",
                 top_size: int | None = None, n_trees: int = 1, subspace: float = 0.5):
        self.n_neighbors, self.cap, self.seed, self.progress, self.linkage = n_neighbors, cap, seed, progress, linkage
        self.top_size, self.n_trees, self.subspace = top_size, n_trees, subspace
        self.fit_weights, self.n_pairs = fit_weights, n_pairs
        self.shape, self.shape_exponent, self.shape_fraction, self.shape_rank = shape, shape_exponent, shape_fraction, shape_rank

    def validate(self, where: str | None = None) -> "WardTreeBuilder":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.tree]"``; default: the class name).
        """
        where = argument_where(self, where)
        check_integer(where, "n_neighbors", self.n_neighbors, 1)
        if self.linkage not in LINKAGES:
            raise ConfigError(f"{where} linkage must be one of {', '.join(map(repr, LINKAGES))}, got {self.linkage!r}")
        check_integer(where, "seed", self.seed, 0)
        check_integer(where, "n_pairs", self.n_pairs, 1, unset=True)
        check_integer(where, "top_size", self.top_size, 2, unset=True)
        check_integer(where, "n_trees", self.n_trees, 1)
        if isinstance(self.subspace, bool) or not isinstance(self.subspace, (int, float)) or not 0 < self.subspace <= 1:
            raise ConfigError(f"{where} subspace = {self.subspace!r} must be a share of the coordinates in (0, 1]")
        check_cap(where, self.cap)
        check_flag(where, "progress", self.progress)
        check_flag(where, "fit_weights", self.fit_weights)
        check_tree_shape(self, where)
        return self

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "WardTreeBuilder":
        what = type(self).__name__
        self.validate()
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids, untrained_ids = np.flatnonzero(mask), np.flatnonzero(~mask)
        n_t, vocab_size = len(trained_ids), len(emb)
        n_nb = check_k(self.n_neighbors, n_t, what, "n_neighbors")
        n_pairs = self.n_pairs
        if self.fit_weights:  # before the tree is grown: a sample that cannot be drawn fails at once
            n_pairs = min(FIT_PAIRS, distinct_pairs(n_t)) if n_pairs is None else n_pairs
            check_sample_size(n_t, n_pairs, argument_where(self, None))
        need = max(n_nb, min(10, n_t - 1)) if self.fit_weights else n_nb
        if knn is None or np.asarray(knn[0]).shape[1] < need:
            base = KnnMetric(need, progress=self.progress).fit(emb, mask)
            knn = (base.indices_, base.costs_)
        knn_idx, knn_dist = check_knn(knn, vocab_size, n_nb, what)
        forest, roots = [], set()
        for t in range(self.n_trees):
            with warnings.catch_warnings():
                if t:  # the graph's components are the same for every tree: said once
                    warnings.filterwarnings("ignore", message=".*components.*", category=UserWarning)
                parent, weight, root, components = self._merge(self._coordinates(emb, t), trained_ids, knn_idx,
                                                               knn_dist, n_nb)
            forest.append((parent, weight))
            roots.add(root)
        if len(roots) != 1 or len({len(parent) for parent, _ in forest}) != 1:  # Ward's numbering guarantees it
            raise VocabMetricError(f"{what}: the trees do not share one root ({sorted(roots)}); please report this")
        (root,) = roots
        fitted = {}
        if self.fit_weights:
            near = np.asarray(knn[0])[:, :10]
            weights, fitted = fit_forest_weights(forest, root, trained_ids, emb, near, n_pairs, self.seed,
                                                 argument_where(self, None), shape=self.tree_shape())
            forest = [(parent, w) for (parent, _), w in zip(forest, weights)]
        forest_params = {"subspace": self.subspace} if self.n_trees > 1 else {}
        return self._finish(forest, root, trained_ids, untrained_ids, self.cap, self.seed, builder="ward",
                            n_neighbors=n_nb, linkage=self.linkage, top_size=self.top_size, components=components,
                            fit_weights=bool(self.fit_weights), **forest_params,
                            **({"weight_fit": fitted} if fitted else {}), **shape_params(fitted))

    def _coordinates(self, emb: np.ndarray, tree: int) -> np.ndarray:
        """The embeddings tree ``tree`` merges on: all of them for one tree; for several, a
        random ``subspace`` share of the coordinates (at least 2), drawn with seed + tree."""
        if self.n_trees == 1:
            return emb
        d = emb.shape[1]
        keep = min(d, max(2, round(self.subspace * d)))
        return emb[:, np.sort(np.random.default_rng(self.seed + tree).choice(d, keep, replace=False))]

    def _merge(self, emb: np.ndarray, trained_ids: np.ndarray, knn_idx: np.ndarray, knn_dist: np.ndarray,
               n_nb: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Ward's merge tree of the trained tokens on the graph: ``(parent, weight, root, components)``,
        token i = node i, merge m = node V + m, weights the centroid distances."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import connected_components
        from sklearn.cluster import AgglomerativeClustering

        n_t, vocab_size = len(trained_ids), len(emb)
        position = np.full(vocab_size, -1, dtype=np.int64)
        position[trained_ids] = np.arange(n_t)
        sub_idx = np.where(knn_idx[trained_ids] >= 0, position[np.maximum(knn_idx[trained_ids], 0)], -1)
        indptr, nbr, _ = knn_graph(sub_idx, knn_dist[trained_ids], n_t)
        connectivity = csr_matrix((np.ones(len(nbr)), nbr, indptr), shape=(n_t, n_t))
        components = int(connected_components(connectivity, directed=False)[0])
        if components > 1:
            warnings.warn(f"{type(self).__name__}: the kNN graph (n_neighbors = {n_nb}) of the {n_t} trained tokens "
                          f"has {components} components; they are joined by an edge between the two closest tokens "
                          "of each pair of components before merging (scikit-learn's fix_connectivity). Raise "
                          "n_neighbors to join them through the graph.", UserWarning, stacklevel=3)
        unit = normalized(emb)[trained_ids].astype(np.float64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*connected components.*")  # said above, in our words
            ward = AgglomerativeClustering(n_clusters=1, linkage=self.linkage, connectivity=connectivity,
                                           compute_full_tree=True).fit(unit)
        up, size, centroid = merge_arrays(ward.children_, unit)
        if self.top_size is not None and n_t > self.top_size:
            up, size, centroid = rebuild_top(up, size, centroid, self.top_size)
        n_nodes = len(up)
        edge = np.zeros(n_nodes)
        has_up = up >= 0
        edge[has_up] = np.linalg.norm(centroid[has_up] - centroid[up[has_up]], axis=1)
        # renumber: trained position p -> token trained_ids[p]; internal node n_t+i -> vocab_size+i
        node_id = np.concatenate([trained_ids, vocab_size + np.arange(n_nodes - n_t)])
        parent = np.full(vocab_size + n_nodes - n_t, -1, dtype=np.int64)
        weight = np.zeros(vocab_size + n_nodes - n_t)
        parent[node_id[has_up]] = node_id[up[has_up]]
        weight[node_id] = edge
        root = int(node_id[np.flatnonzero(~has_up)[0]]) if n_t > 1 else int(trained_ids[0])
        return parent, weight, root, components


def merge_arrays(children: np.ndarray, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(up, size, centroid)`` of a scikit-learn merge list over ``n`` points: node ``n + i``
    is merge ``i`` of ``children[i]``; ``up`` (2n−1,) its parent (−1: the root), ``size`` its
    tokens, ``centroid`` (2n−1, d) their mean unit vector. O(n·d)."""
    n = len(unit)
    n_merged = 2 * n - 1
    centroid = np.empty((n_merged, unit.shape[1]))
    size = np.ones(n_merged)
    centroid[:n] = unit
    up = np.full(n_merged, -1, dtype=np.int64)
    for i, (a, b) in enumerate(children):
        node = n + i
        size[node] = size[a] + size[b]
        centroid[node] = (size[a] * centroid[a] + size[b] * centroid[b]) / size[node]
        up[a] = up[b] = node
    return up, size, centroid


def rebuild_top(up: np.ndarray, size: np.ndarray, centroid: np.ndarray, top_size: int):
    """Keep the graph-constrained merges below clusters of at most ``top_size`` tokens; join
    those clusters by an unconstrained Ward clustering of their centroids (scipy, weighted by
    nothing: one point per cluster), because the constrained merges at the top join whatever
    clusters happen to share a graph edge. Returns ``(up, size, centroid)`` renumbered: the
    ``n`` points first, the kept merges, then the new top merges. Cost O(c²·d) for c clusters."""
    from scipy.cluster.hierarchy import linkage

    keep = size <= top_size  # every node inside a cluster (a node above one is larger)
    roots = np.flatnonzero(keep & ((up < 0) | ~keep[np.maximum(up, 0)]))
    kept = np.flatnonzero(keep)
    local = np.full(len(up), -1, dtype=np.int64)
    local[kept] = np.arange(len(kept))  # points stay first: they are the first n ids and all kept
    c = len(roots)
    top = linkage(centroid[roots], method="ward") if c > 1 else np.zeros((0, 4))
    n_new = len(kept) + max(c - 1, 0)
    new_up = np.full(n_new, -1, dtype=np.int64)
    new_size = np.empty(n_new)
    new_centroid = np.empty((n_new, centroid.shape[1]))
    inside = kept[~np.isin(kept, roots)]
    new_up[local[inside]] = local[up[inside]]
    new_size[: len(kept)], new_centroid[: len(kept)] = size[kept], centroid[kept]
    ids = list(local[roots])  # scipy's cluster j < c is root j; cluster c + m is top merge m
    for m, (a, b, _, _) in enumerate(top):
        node = len(kept) + m
        a, b = ids[int(a)], ids[int(b)]
        new_up[a] = new_up[b] = node
        new_size[node] = new_size[a] + new_size[b]
        new_centroid[node] = (new_size[a] * new_centroid[a] + new_size[b] * new_centroid[b]) / new_size[node]
        ids.append(node)
    return new_up, new_size, new_centroid
