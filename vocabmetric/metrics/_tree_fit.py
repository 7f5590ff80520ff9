"""Tree edge weights fitted to sampled l2 distances (Yamada et al., TMLR 2022).

A tree's topology fixes which edges lie on the path between two tokens; its weights fix
how long the path is. Given sampled pairs ``(i, j)`` with target distances ``l2(i, j)``,
the fitted weights solve the least squares

.. math::

    \\min_{w ≥ 0} \\sum_{(i,j)} \\Big(\\sum_{e ∈ \\mathrm{path}(i,j)} w_e − l2(i, j)\\Big)^2
    + damp^2 \\lVert w − s w_0 \\rVert^2

(``w0`` the geometric lengths, ``s`` their least-squares scale), solved by LSMR and clipped
at ``w ≥ floor``; ``A[pair, edge] = 1`` when the edge lies on the pair's path (sparse: at most 2·depth ones
a row). For T trees averaged (``n_trees``) the fit is joint, on the mean distance: the paths of
all trees in one row, ``A[pair, edge] = 1/T``, so one tree's error can offset another's.
The sample mixes random pairs (which set the scale of far pairs) with each sampled token's
nearest neighbours (so near pairs are fitted too). Edges no pair crosses keep their scaled
geometric length. The weights cannot undo a topology that splits neighbours high up (a fit
pays for their long paths with every far pair crossing the same edges): that is what
TreeBuilder's ``follow_knn`` is for.
scipy's bounded ``lsq_linear`` was tried: unconverged after 50 iterations
(2–10 min on the demo store) and, unregularized, it overfit the per-token leaf edges.

Cost: building ``A`` is O(n_pairs·T·depth); the solve ≤ 200 LSMR steps, O(nnz(A)) each
(~30 s for 100k pairs and 8 trees on the demo store, 2 cores).

Example
-------
>>> weight, stats = fit_edge_weights(parent, weight, depth, (a, b), l2)   # doctest: +SKIP
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError

LOG = logging.getLogger(__name__)

#: Share of the fitted sample that is nearest-neighbour pairs (the rest are random pairs).
#: On the demo store (99.5k usable tokens, 4 binary trees following the kNN graph, damp 5):
#: 0.5 / 0.75 gave Spearman(tree, l2) 0.850 / 0.832 and 10-NN contrast 0.312 / 0.302 (l2: 0.291).
NEAR_SHARE = 0.5
#: Nearest neighbours per sampled token in the near part of the sample (and the neighbours
#: that TreeBuilder's ``follow_knn`` splits follow).
NEAR_K = 10
#: Ridge of the fit toward the scaled geometric weights: on the demo store (as for
#: NEAR_SHARE), damp 1 / 5 / 20 gave Spearman 0.715 / 0.850 / 0.864 and 10-NN contrast
#: 0.313 / 0.312 / 0.335 (l2: 0.291). Weighting each row by 1/l2 (a relative-error fit) at
#: damp 5 gave 0.755 / 0.290: it buys the near pairs with the far ones' ranks.
DAMP = 5.0


def path_edges(parent: np.ndarray, depth: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The edges on the tree path of each pair of nodes ``(a[t], b[t])``.

    Returns ``(rows, edges)``: pair ``rows[s]`` crosses the edge from node ``edges[s]`` up to
    its parent. Walks both ends up to their lowest common ancestor, one step per loop for
    every pair still apart: O(n_pairs·depth).
    """
    a, b = a.astype(np.int64).copy(), b.astype(np.int64).copy()
    live = np.flatnonzero(a != b)
    rows, edges = [], []
    while live.size:
        x, y = a[live], b[live]
        up_x = depth[x] >= depth[y]
        up_y = depth[y] >= depth[x]
        rows += [live[up_x], live[up_y]]
        edges += [x[up_x], y[up_y]]
        a[live[up_x]] = parent[x[up_x]]
        b[live[up_y]] = parent[y[up_y]]
        live = live[a[live] != b[live]]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(edges)


def distinct_pairs(n_trained: int) -> int:
    """How many distinct pairs ``n_trained`` tokens give: n·(n − 1)/2."""
    return n_trained * (n_trained - 1) // 2


def check_sample_size(n_trained: int, n_pairs: int, where: str) -> None:
    """Raise :class:`~vocabmetric.errors.ConfigError` naming ``n_pairs`` when ``n_trained``
    tokens cannot give that many distinct pairs (the fit's sample could not be drawn)."""
    reachable = distinct_pairs(n_trained)
    if n_pairs > reachable:
        raise ConfigError(f"{where} n_pairs = {n_pairs} cannot be sampled: {n_trained} trained tokens give only "
                          f"{reachable} distinct pairs; lower n_pairs or set fit_weights = false")


def sample_pairs(trained_ids: np.ndarray, knn_indices: np.ndarray | None, n_pairs: int, seed: int,
                 where: str = "fit_weights:") -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` distinct-token pairs: :data:`NEAR_SHARE` of them a sampled token and one of
    its :data:`NEAR_K` nearest (``knn_indices`` (V, k), -1 = empty), the rest random trained pairs.

    Raises :class:`~vocabmetric.errors.ConfigError` naming ``n_pairs`` when the trained
    tokens cannot give that many distinct pairs.
    """
    check_sample_size(len(trained_ids), n_pairs, where)
    rng = np.random.default_rng(seed)
    a_near = b_near = np.zeros(0, np.int64)
    if knn_indices is not None and knn_indices.shape[1]:
        k = min(NEAR_K, knn_indices.shape[1])
        src = rng.choice(trained_ids, int(np.ceil(n_pairs * NEAR_SHARE / k)))
        nb = knn_indices[src, :k]
        ok = (nb >= 0) & (nb != src[:, None])
        a_near, b_near = np.broadcast_to(src[:, None], nb.shape)[ok], nb[ok]
    n_random = max(n_pairs - len(a_near), 0)
    a = rng.choice(trained_ids, 2 * n_random + 16)
    b = rng.choice(trained_ids, 2 * n_random + 16)
    keep = a != b
    a, b = a[keep][:n_random], b[keep][:n_random]
    return np.concatenate([a_near, a]).astype(np.int64), np.concatenate([b_near, b]).astype(np.int64)


def fit_edge_weights(parent: np.ndarray, weight: np.ndarray, depth: np.ndarray, pairs: tuple[np.ndarray, np.ndarray],
                     target: np.ndarray, *, n_trees: int = 1, floor: float = 0.0,
                     damp: float = DAMP) -> tuple[np.ndarray, dict]:
    """Least-squares edge weights, kept near the geometric ones (see the module docstring).

    ``parent``, ``weight``, ``depth`` (n_nodes,): the tree, or ``n_trees`` trees stacked
    with global node ids (a forest); ``pairs``: two (n_trees·n,) node id arrays, the n
    pairs' nodes in tree 0, then in tree 1, …; ``target`` (n,): their l2 distances. The fit
    is joint: a pair's modelled distance is the mean over the trees,
    ``A[pair, edge] = 1/n_trees`` on each tree's path. The geometric weights ``w0`` are
    first scaled by the least-squares factor ``s``; then ``w = max(s·w0 + δ, floor)`` with
    ``δ = argmin ‖A(s·w0 + δ) − b‖² + damp²·‖δ‖²`` (LSMR on the sparse ``A``; the ridge keeps
    the ~one weight per token that few pairs cross from overfitting them, which an
    unregularized NNLS did on the demo store). Edges no pair crosses keep ``s·w0``. Returns
    the weights and fit statistics (pairs, fitted edges, scale, rms residual before and after).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import lsmr

    n_pairs = len(target)
    rows, edges = path_edges(parent, depth, *pairs)
    used, column = np.unique(edges, return_inverse=True)
    A = csr_matrix((np.full(len(rows), 1.0 / n_trees), (rows % max(n_pairs, 1), column)), shape=(n_pairs, len(used)))
    b = np.asarray(target, dtype=np.float64)
    along = A @ weight[used]
    scale = float(along @ b / (along @ along)) if along @ along > 0 else 1.0
    start = scale * weight[used]
    delta = lsmr(A, b - A @ start, damp=damp, maxiter=200)[0]
    fitted = scale * weight
    fitted[used] = np.maximum(start + delta, floor)
    before = float(np.sqrt(np.mean((along - b) ** 2)))
    after = float(np.sqrt(np.mean((A @ fitted[used] - b) ** 2)))
    stats = {"n_pairs": int(len(b)), "n_fitted_edges": int(len(used)), "scale": scale, "rms_before": before,
             "rms_after": after}
    LOG.info("tree weights fitted: %d pairs, %d edges, rms %.4f -> %.4f", len(b), len(used), before, after)
    return fitted, stats


def nearest_indices(embeddings: np.ndarray, mask: np.ndarray, knn: object) -> np.ndarray:
    """(V, ≤ :data:`NEAR_K`) token ids of each trained token's nearest trained tokens (-1 =
    empty; self excluded): the first columns of ``knn = (indices, costs)``, or an exact
    :class:`~vocabmetric.metrics.KnnMetric` search when None (O(V²·d) flat faiss)."""
    from ._knn import KnnMetric

    if knn is not None:
        return np.asarray(knn[0])[:, :NEAR_K]
    return KnnMetric(min(NEAR_K, int(mask.sum()) - 1), progress=False).fit(embeddings, mask).indices_


def shaped_l2(shape, embeddings: np.ndarray, trained_ids: np.ndarray, knn_indices: np.ndarray | None, seed: int,
              where: str):
    """``target(a, b)``: the l2 distance of token pairs through a fitted
    :class:`~vocabmetric.metrics.CostShape` (None or ``"none"``: plain l2). The shape's cap is
    l2's (:func:`~vocabmetric.metrics.choose_cap` over random trained pairs); ``"fraction"``
    fits its exponent to the l2 distance of each trained token's ``rank``-th neighbour in
    ``knn_indices``. ``"rank"`` shapes a neighbour table, not a tree: a ConfigError."""
    from .._util.vectors import l2_distance
    from ._checks import CAP_PAIRS, choose_cap, random_pairs

    if shape is None or shape.shape == "none":
        return lambda a, b: l2_distance(embeddings, a, b)
    shape.validate(where)
    if shape.shape == "rank":
        raise ConfigError(f"{where} shape = 'rank' ranks a stored neighbour table; a tree's weights are fitted to "
                          "distances: use shape = 'fraction' or 'power'")
    cap, _ = choose_cap(l2_distance(embeddings, *random_pairs(trained_ids, CAP_PAIRS, seed)), np.zeros(0), None, where)
    rank_costs = np.zeros(0)
    if shape.shape == "fraction":
        if knn_indices is None or knn_indices.shape[1] < shape.rank:
            have = 0 if knn_indices is None else knn_indices.shape[1]
            raise ConfigError(f"{where} shape_rank = {shape.rank} needs that many nearest neighbours, the tree "
                              f"reads {have} (at most {NEAR_K}); lower shape_rank")
        nb = knn_indices[trained_ids, shape.rank - 1]
        ok = nb >= 0
        rank_costs = l2_distance(embeddings, trained_ids[ok], nb[ok])
    shape.fit(rank_costs, cap, where)
    return lambda a, b: shape.transform(l2_distance(embeddings, a, b), cap)


def fit_forest_weights(forest: list[tuple[np.ndarray, np.ndarray]], root: int, trained_ids: np.ndarray,
                       embeddings: np.ndarray, knn_indices: np.ndarray, n_pairs: int, seed: int,
                       where: str, shape=None) -> tuple[list[np.ndarray], dict]:
    """Fitted weights of a builder's trees (``(parent, weight)`` each, token i = node i, root
    ``root``, before untrained tokens are hung), jointly for their mean distance:
    :func:`sample_pairs` of the trained tokens (near pairs from ``knn_indices``, see
    :func:`nearest_indices`), their l2 distances (through ``shape``, :func:`shaped_l2`),
    :func:`fit_edge_weights` on the stacked forest. ``where`` names the builder in errors."""
    from ..cost import TreeMetric

    vocab_size = len(embeddings)
    mask = np.zeros(vocab_size, bool)
    mask[trained_ids] = True
    target = shaped_l2(shape, embeddings, trained_ids, knn_indices, seed, where)
    a, b = sample_pairs(trained_ids, knn_indices, n_pairs, seed, where)
    parents, depths, offset, ends_a, ends_b = [], [], 0, [], []
    for parent, weight in forest:
        whole = parent.copy()
        whole[np.flatnonzero(~mask)] = root
        whole[root] = -1
        depths.append(TreeMetric(whole, weight, np.arange(vocab_size)).depth)
        parents.append(np.where(whole >= 0, whole + offset, -1))
        ends_a.append(a + offset)
        ends_b.append(b + offset)
        offset += len(parent)
    fitted, stats = fit_edge_weights(np.concatenate(parents), np.concatenate([w for _, w in forest]),
                                     np.concatenate(depths), (np.concatenate(ends_a), np.concatenate(ends_b)),
                                     target(a, b), n_trees=len(forest), floor=0.0)
    if shape is not None and shape.shape != "none":
        stats["shape"] = shape.params_
    bounds = np.cumsum([0] + [len(p) for p, _ in forest])
    return [fitted[s:e] for s, e in zip(bounds[:-1], bounds[1:])], stats
