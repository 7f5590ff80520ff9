"""Tree edge weights fitted to sampled l2 distances (Yamada et al., TMLR 2022).

A tree's topology fixes which edges lie on the path between two tokens; its weights fix
how long the path is. Given sampled pairs ``(i, j)`` with target distances ``l2(i, j)``,
the fitted weights solve the least squares

.. math::

    \\min_{w ≥ 0} \\sum_{(i,j)} \\Big(\\sum_{e ∈ \\mathrm{path}(i,j)} w_e − l2(i, j)\\Big)^2
    + damp^2 \\lVert w − s w_0 \\rVert^2

(``w0`` the geometric lengths, ``s`` their least-squares scale), solved by LSMR and clipped
at ``w ≥ floor``; ``A[pair, edge] = 1`` when the edge lies on the pair's path (sparse: at most 2·depth ones
a row). The sample mixes random pairs (which set the scale of far pairs) with each
sampled token's nearest neighbours (so near pairs are fitted too, and the tree keeps the
near/far contrast of the metric). Edges no pair crosses keep their scaled geometric length.
scipy's bounded ``lsq_linear`` was tried: unconverged after 50 iterations
(2–10 min on the demo store) and, unregularized, it overfit the per-token leaf edges.

Cost: building ``A`` is O(n_pairs·depth); the solve ≤ 200 LSMR steps, O(nnz(A)) each
(~10 s for 100k pairs on the demo store).

Example
-------
>>> weight = fit_edge_weights(parent, weight, pairs=(a, b), target=l2)   # doctest: +SKIP
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError

LOG = logging.getLogger(__name__)

#: Share of the fitted sample that is nearest-neighbour pairs (the rest are random pairs).
NEAR_SHARE = 0.5
#: Nearest neighbours per sampled token in the near part of the sample.
NEAR_K = 10


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


def sample_pairs(trained_ids: np.ndarray, knn_indices: np.ndarray | None, n_pairs: int, seed: int,
                 where: str = "fit_weights:") -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` distinct-token pairs: :data:`NEAR_SHARE` of them a sampled token and one of
    its :data:`NEAR_K` nearest (``knn_indices`` (V, k), -1 = empty), the rest random trained pairs.

    Raises :class:`~vocabmetric.errors.ConfigError` naming ``n_pairs`` when the trained
    tokens cannot give that many distinct pairs.
    """
    n_trained = len(trained_ids)
    reachable = n_trained * (n_trained - 1) // 2
    if n_pairs > reachable:
        raise ConfigError(f"{where} n_pairs = {n_pairs} cannot be sampled: {n_trained} trained tokens give only "
                          f"{reachable} distinct pairs; lower n_pairs or set fit_weights = false")
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
                     target: np.ndarray, *, floor: float = 0.0, damp: float = 1.0) -> tuple[np.ndarray, dict]:
    """Least-squares edge weights, kept near the geometric ones (see the module docstring).

    ``parent``, ``weight``, ``depth`` (n_nodes,): the tree (token i is node i); ``pairs``:
    two (n,) token id arrays; ``target`` (n,): their l2 distances. The geometric weights
    ``w0`` are first scaled by the least-squares factor ``s``; then
    ``w = max(s·w0 + δ, floor)`` with ``δ = argmin ‖A(s·w0 + δ) − b‖² + damp²·‖δ‖²`` (LSMR on
    the sparse ``A``; the ridge keeps the ~one weight per token that few pairs cross from
    overfitting them, which an unregularized NNLS did on the demo store). Edges no pair
    crosses keep ``s·w0``. Returns the weights and fit statistics (pairs, fitted edges,
    scale, rms residual before and after).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import lsmr

    rows, edges = path_edges(parent, depth, *pairs)
    used, column = np.unique(edges, return_inverse=True)
    A = csr_matrix((np.ones(len(rows)), (rows, column)), shape=(len(target), len(used)))
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


def fit_tree_weights(parent: np.ndarray, weight: np.ndarray, root: int, trained_ids: np.ndarray, embeddings: np.ndarray,
                     knn: object, n_pairs: int, seed: int, where: str) -> tuple[np.ndarray, dict]:
    """A builder's tree (``parent``/``weight`` before untrained tokens are hung) with fitted
    weights: :func:`sample_pairs` of the trained tokens (near pairs from ``knn`` =
    ``(indices, costs)``, or an exact :data:`NEAR_K`-NN search when None), their l2 distances,
    :func:`fit_edge_weights`. ``where`` names the builder in errors."""
    from .._vectors import l2_distance
    from ..operator import TreeMetric
    from ._knn import KnnMetric

    vocab_size = len(embeddings)
    mask = np.zeros(vocab_size, bool)
    mask[trained_ids] = True
    whole = parent.copy()
    whole[np.flatnonzero(~mask)] = root
    whole[root] = -1
    depth = TreeMetric(whole, weight, np.arange(vocab_size)).depth
    if knn is None:
        knn_indices = KnnMetric(min(NEAR_K, len(trained_ids) - 1), progress=False).fit(embeddings, mask).indices_
    else:
        knn_indices = np.asarray(knn[0])
    a, b = sample_pairs(trained_ids, knn_indices, n_pairs, seed, where)
    return fit_edge_weights(whole, weight, depth, (a, b), l2_distance(embeddings, a, b), floor=0.0)
