"""Ground metrics over a vocabulary, built from token embeddings: arrays in, arrays out.

Every builder reads like scikit-learn: configure, ``fit(embeddings, trained)``, read the
learned state (trailing underscore). ``embeddings`` is ``(V, d)`` float32 (row i = token
id i); ``trained`` is ``(V,)`` bool. An untrained token (never seen in the corpus) is
*isolated*: it has no stored neighbour and is nobody's neighbour, so every cost to it is
the cap.

Truncated metrics (:class:`L2Metric`, :class:`KnnMetric`, :class:`GeodesicMetric`,
:class:`UmapMetric`) end with

* ``indices_`` (V, k) int32, ``-1`` = empty slot; rows sorted by cost, cheapest first;
* ``costs_`` (V, k) float32, finite and >= 0 in filled slots, ``cap_`` in empty ones;
* ``cap_`` float >= every stored cost: by default the 99th percentile of the metric over
  random trained pairs, raised to the largest stored cost when that is higher
  (``params_["cap_statistic"]`` says so); pass ``cap=`` to fix it;
* ``params_`` dict of plain values, to be stored as attrs (kind, k, cap, cap_statistic, …).

``to_operator()`` wraps them in a :class:`~vocabmetric.operator.CostOperator`. The tree
builders (:class:`TreeBuilder`, :class:`WardTreeBuilder`) live in
:mod:`vocabmetric.hierarchy` and are re-exported here.

``l2`` versus ``knn``: the l2 metric is the normalized Euclidean distance
``‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` in [0, 2]. :func:`l2_distance` gives it exactly for any pair;
:class:`L2Metric` is its exact top-k table (faiss ``IndexFlatIP``). :class:`KnnMetric` is
the same table built with a choice of index: with ``index="flat"`` its arrays equal
``L2Metric``'s, with ``index="hnsw"`` it is approximate (some true neighbours missed) but
every stored cost is still the exact float64 l2 distance. Build the flat table once and
pass it as ``knn=(indices_, costs_)`` to the geodesic, umap and tree builders.

Example
-------
>>> knn = KnnMetric(k=64).fit(embeddings, trained)
>>> geo = GeodesicMetric(k_graph=10, k=128).fit(embeddings, trained, knn=(knn.indices_, knn.costs_))
>>> geo.to_operator().neighbors(42)
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import numpy as np

from .errors import VocabMetricError
from .operator import CostOperator

LOG = logging.getLogger(__name__)

#: Random trained pairs sampled to set the default cap.
CAP_PAIRS = 20000
#: The default cap is this quantile of the metric over random trained pairs.
CAP_QUANTILE = 0.99


# -- inputs -----------------------------------------------------------------------------
def check_inputs(embeddings: Any, trained: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(embeddings, trained)`` and return them as float32 (V, d) and bool (V,).

    Raises :class:`VocabMetricError` naming the offending shape, row or value.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
        raise VocabMetricError(f"{what}: embeddings must be a (V, d) array with V >= 2, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.number):
        raise VocabMetricError(f"{what}: embeddings must be numeric, got dtype {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    vocab_size = emb.shape[0]
    if trained is None:
        mask = np.ones(vocab_size, dtype=bool)
    else:
        mask = np.asarray(trained)
        if mask.shape != (vocab_size,):
            raise VocabMetricError(
                f"{what}: trained must have shape ({vocab_size},) to match embeddings {emb.shape}, "
                f"got {mask.shape}"
            )
        if mask.dtype != bool:
            if not np.all(np.isin(mask, (0, 1))):
                raise VocabMetricError(f"{what}: trained must be a boolean mask, got dtype {mask.dtype}")
            mask = mask.astype(bool)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise VocabMetricError(
            f"{what}: embeddings row {row} (token id {row}) has a NaN or infinite value "
            f"({(~finite).sum()} such rows); fix the embedding step before building metrics"
        )
    zero = mask & (np.einsum("ij,ij->i", emb, emb) == 0)
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise VocabMetricError(
            f"{what}: trained token id {row} has an all-zero embedding, which has no direction; "
            "mark it untrained or fix its embedding"
        )
    return emb, mask


def check_k(k: int, n_trained: int, what: str, name: str = "k") -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise VocabMetricError(f"{what}: {name} must be a positive integer, got {k!r}")
    if k >= n_trained:
        raise VocabMetricError(
            f"{what}: {name}={k} must be smaller than the number of trained tokens ({n_trained}); "
            f"lower {name} or train on a larger corpus"
        )
    return int(k)


def check_knn(knn: Any, vocab_size: int, need: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a precomputed kNN table ``(indices (V, >=need), distances)``."""
    try:
        idx, dist = knn
    except (TypeError, ValueError):
        raise VocabMetricError(f"{what}: knn must be a pair (indices, distances), got {type(knn).__name__}") from None
    idx, dist = np.asarray(idx), np.asarray(dist)
    if idx.ndim != 2 or idx.shape != dist.shape or idx.shape[0] != vocab_size:
        raise VocabMetricError(
            f"{what}: knn indices {idx.shape} and distances {dist.shape} must both be ({vocab_size}, k)"
        )
    if idx.shape[1] < need:
        raise VocabMetricError(
            f"{what}: the precomputed knn has {idx.shape[1]} neighbours per token but {need} are "
            f"needed; build KnnMetric with k >= {need}"
        )
    return idx[:, :need].astype(np.int64), dist[:, :need].astype(np.float64)


def normalized(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero."""
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.where(norms > 0, norms, 1)).astype(np.float32)


def progress_bar(iterable: Any, progress: bool | None, **kwds: Any) -> Any:
    """tqdm over ``iterable``; ``progress=None`` shows it only when stderr is a TTY."""
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(iterable, disable=disable, leave=False, **kwds)


# -- exact l2 ---------------------------------------------------------------------------
def l2_distance(embeddings: Any, i: Any, j: Any) -> np.ndarray | float:
    """Exact normalized Euclidean distance ``‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` in float64.

    ``i`` and ``j`` are token ids (ints or broadcastable int arrays). Range [0, 2].
    Computed from the difference, not from ``√(2 − 2·cos)``, so duplicates give exactly 0.
    """
    emb = np.asarray(embeddings)
    scalar = np.ndim(i) == 0 and np.ndim(j) == 0
    i, j = np.broadcast_arrays(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
    a = emb[i].astype(np.float64)
    b = emb[j].astype(np.float64)
    a /= np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-300)
    b /= np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-300)
    d = np.linalg.norm(a - b, axis=-1)
    return float(d) if scalar else d


def _pair_l2(vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray, batch: int = 1 << 16) -> np.ndarray:
    """Exact float64 l2 between normalized rows ``rows[t]`` and ``cols[t]`` (flat int arrays).

    Normalizes in float64 from the raw ``vectors``, so two rows with the same direction
    (x and 3·x) are at distance ~1e-16, not at the float32 rounding of x/‖x‖.
    """
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), batch):
        a = vectors[rows[s : s + batch]].astype(np.float64)
        b = vectors[cols[s : s + batch]].astype(np.float64)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        out[s : s + batch] = np.linalg.norm(a - b, axis=1)
    return out


def random_pairs(trained_ids: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random pairs of distinct trained token ids."""
    rng = np.random.default_rng(seed)
    a = rng.choice(trained_ids, n_pairs)
    b = rng.choice(trained_ids, n_pairs)
    keep = a != b
    return a[keep], b[keep]


def choose_cap(sample: np.ndarray, stored: np.ndarray, cap: float | None, what: str) -> tuple[float, str]:
    """The cap and the statistic that set it (see the module docstring)."""
    stored_max = float(stored.max()) if stored.size else 0.0
    if cap is not None:
        cap = float(cap)
        if not np.isfinite(cap) or cap <= 0 or cap < stored_max:
            raise VocabMetricError(
                f"{what}: cap={cap} must be finite, > 0 and >= the largest stored cost {stored_max:.6g}"
            )
        return cap, "given"
    sample = sample[np.isfinite(sample)]
    quantile = float(np.quantile(sample, CAP_QUANTILE)) if sample.size else 0.0
    statistic = f"max(p{CAP_QUANTILE * 100:g} of {sample.size} random trained pairs, max stored cost)"
    value = max(quantile, stored_max)
    if value <= 0:  # all tokens identical: any positive cap bounds the zero costs
        value, statistic = 1.0, "1.0 (every sampled distance was 0)"
    return value, statistic


# -- truncated metrics ------------------------------------------------------------------
class _TruncatedMetric:
    """Shared state and helpers of the (V, k) truncated metrics."""

    kind = "?"
    indices_: np.ndarray
    costs_: np.ndarray
    cap_: float
    params_: dict

    def to_operator(self, fingerprint: str | None = None) -> CostOperator:
        """The fitted metric as a :class:`CostOperator`."""
        if not hasattr(self, "indices_"):
            raise VocabMetricError(f"{type(self).__name__} is not fitted; call fit(embeddings, trained) first")
        return CostOperator(self.indices_, self.costs_, self.cap_, fingerprint)

    def _finish(self, indices: np.ndarray, costs: np.ndarray, sample: np.ndarray, cap: float | None, **params: Any):
        """Sort rows, fill empty slots with the cap, set ``indices_, costs_, cap_, params_``."""
        valid = indices >= 0
        order = np.argsort(np.where(valid, costs, np.inf), axis=1, kind="stable")
        indices = np.take_along_axis(indices, order, 1)
        costs = np.take_along_axis(costs, order, 1)
        valid = indices >= 0
        self.cap_, statistic = choose_cap(sample, costs[valid], cap, type(self).__name__)
        self.indices_ = np.ascontiguousarray(indices, dtype=np.int32)
        self.costs_ = np.ascontiguousarray(np.where(valid, costs, self.cap_), dtype=np.float32)
        # float32 rounding may lift a stored cost a hair above a cap that equals it
        self.costs_ = np.minimum(self.costs_, np.float32(self.cap_))
        self.params_ = {"kind": self.kind, "k": int(indices.shape[1]), "cap": self.cap_, "cap_statistic": statistic, **params}
        LOG.info("%s: V=%d k=%d cap=%.4g (%s)", type(self).__name__, len(indices), indices.shape[1], self.cap_, statistic)
        return self


class KnnMetric(_TruncatedMetric):
    """Each token's ``k`` nearest trained tokens by normalized Euclidean distance (faiss).

    Parameters
    ----------
    k : int
        Neighbours kept per token (self excluded); must be < the number of trained tokens.
    index : {"flat", "hnsw"}
        ``"flat"``: exact search, ``IndexFlatIP`` on the unit vectors, O(V²·d) time.
        ``"hnsw"``: ``IndexHNSWFlat`` (inner product), approximate, roughly O(V·log V·d).
    cap : float, optional
        Fix the cap; by default derived from random trained pairs.
    hnsw_m, ef_search : int
        HNSW graph degree and search breadth (``ef_search`` defaults to max(2k, 64)).
    batch_size : int
        Queries per faiss call (the progress bar advances per batch).
    progress : bool, optional
        Show a progress bar; default: only when stderr is a TTY.
    seed : int
        Seed of the cap's random pairs.

    Every kept distance is recomputed in float64 from the vectors; the self hit is dropped
    by id (with duplicate vectors it need not come first), and rows are re-sorted.
    """

    kind = "knn"

    def __init__(self, k: int = 64, index: str = "flat", cap: float | None = None, *, hnsw_m: int = 32,
                 ef_search: int | None = None, batch_size: int = 4096, progress: bool | None = None, seed: int = 0):
        self.k, self.index, self.cap = k, index, cap
        self.hnsw_m, self.ef_search, self.batch_size = hnsw_m, ef_search, batch_size
        self.progress, self.seed = progress, seed

    def fit(self, embeddings: Any, trained: Any = None) -> "KnnMetric":
        what = type(self).__name__
        if self.index not in ("flat", "hnsw"):
            raise VocabMetricError(f"{what}: index must be 'flat' or 'hnsw', got {self.index!r}")
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids = np.flatnonzero(mask)
        k = check_k(self.k, len(trained_ids), what)
        unit = normalized(emb)
        found = self._search(unit[trained_ids], k)  # positions among trained, -1 = none
        indices = np.full((len(emb), k), -1, dtype=np.int64)
        costs = np.zeros((len(emb), k), dtype=np.float64)
        rows_t = np.repeat(trained_ids, k)
        ids = np.where(found >= 0, trained_ids[np.maximum(found, 0)], -1)
        indices[trained_ids] = ids
        ok = ids.ravel() >= 0
        costs[trained_ids] = _scatter(ok, _pair_l2(emb, rows_t[ok], ids.ravel()[ok]), ids.shape)
        a, b = random_pairs(trained_ids, CAP_PAIRS, self.seed)
        return self._finish(indices, costs, _pair_l2(emb, a, b), self.cap, index=self.index)

    def _search(self, unit: np.ndarray, k: int) -> np.ndarray:
        """k+1 nearest by inner product among ``unit`` rows, self dropped by id: (n, k)."""
        import faiss

        n, d = unit.shape
        if self.index == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search or max(2 * (k + 1), 64)
        index.add(unit)
        out = np.empty((n, k), dtype=np.int64)
        starts = range(0, n, self.batch_size)
        for s in progress_bar(starts, self.progress, desc=f"{self.index} kNN", unit="batch"):
            _, hits = index.search(unit[s : s + self.batch_size], k + 1)
            out[s : s + len(hits)] = drop_self(hits, np.arange(s, s + len(hits)))
        return out


class L2Metric(KnnMetric):
    """The exact top-``k`` table of the normalized Euclidean distance (see :func:`l2_distance`).

    ``KnnMetric(index="flat")`` under the name ``l2``: exact search, exact costs in [0, 2].
    """

    kind = "l2"

    def __init__(self, k: int = 64, cap: float | None = None, *, batch_size: int = 4096,
                 progress: bool | None = None, seed: int = 0):
        super().__init__(k, "flat", cap, batch_size=batch_size, progress=progress, seed=seed)


def drop_self(hits: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """From (n, k+1) hits, remove each row's own id (or the last hit if absent): (n, k).

    By id, not by position: with duplicate vectors the self hit may sit anywhere.
    """
    n, k1 = hits.shape
    is_self = hits == self_ids[:, None]
    # drop the first self hit; rows without one drop their last column
    drop = np.where(is_self.any(1), is_self.argmax(1), k1 - 1)
    keep = np.ones_like(hits, dtype=bool)
    keep[np.arange(n), drop] = False
    return hits[keep].reshape(n, k1 - 1)


def _scatter(ok: np.ndarray, values: np.ndarray, shape: tuple) -> np.ndarray:
    out = np.zeros(ok.shape, dtype=np.float64)
    out[ok] = values
    return out.reshape(shape)


# -- geodesic ---------------------------------------------------------------------------
def knn_graph(knn_idx: np.ndarray, knn_dist: np.ndarray, vocab_size: int):
    """The symmetrized kNN graph as CSR arrays ``(indptr, neighbours, weights)``.

    An edge {i, j} exists when j is among i's neighbours or i among j's; zero-length edges
    (duplicate vectors) are kept (scipy.sparse would drop them).
    """
    rows = np.repeat(np.arange(vocab_size, dtype=np.int64), knn_idx.shape[1])
    cols, w = knn_idx.ravel(), knn_dist.ravel()
    ok = (cols >= 0) & (cols != rows)
    rows, cols, w = rows[ok], cols[ok], w[ok]
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    _, first = np.unique(lo * vocab_size + hi, return_index=True)
    lo, hi, w = lo[first], hi[first], w[first]
    src, dst, w = np.concatenate([lo, hi]), np.concatenate([hi, lo]), np.concatenate([w, w])
    order = np.argsort(src, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=vocab_size))]).astype(np.int64)
    return indptr, dst[order].astype(np.int32), w[order].astype(np.float64)


class GeodesicMetric(_TruncatedMetric):
    """Shortest-path length on the symmetrized kNN graph; each token keeps its ``k`` nearest.

    Parameters
    ----------
    k_graph : int
        Degree of the kNN graph before symmetrization (edge length = exact l2).
    k : int
        Neighbours kept per token, by path length.
    cap : float, optional
        Fix the cap; by default the 99th percentile of path lengths between random trained
        pairs (from ``n_cap_sources`` full single-source searches), raised to the largest
        stored cost. Pairs in different components are never stored: they cost the cap.
    n_jobs : int, optional
        Threads for the Dijkstra kernel (default: all cores).
    batch_size, progress, seed
        Sources per kernel call, progress bar, seed of the cap's random pairs.

    Bounded Dijkstra from every trained source stops after ``k`` settled nodes besides the
    source: O(k·deg·log(k·deg)) per source, O(V·k) memory in all; no V×V object. The
    kernel is compiled with numba (a dependency of umap-learn) and runs sources in
    parallel threads: compiled code holds no GIL, so threads scale like processes without
    copying the graph into each worker.
    """

    kind = "geodesic"

    def __init__(self, k_graph: int = 10, k: int = 128, cap: float | None = None, n_jobs: int | None = None, *,
                 batch_size: int = 8192, n_cap_sources: int = 16, progress: bool | None = None, seed: int = 0):
        self.k_graph, self.k, self.cap, self.n_jobs = k_graph, k, cap, n_jobs
        self.batch_size, self.n_cap_sources, self.progress, self.seed = batch_size, n_cap_sources, progress, seed

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "GeodesicMetric":
        what = type(self).__name__
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids = np.flatnonzero(mask)
        k_graph = check_k(self.k_graph, len(trained_ids), what, "k_graph")
        k = check_k(self.k, len(trained_ids), what)
        if knn is None:
            base = KnnMetric(k_graph, progress=self.progress).fit(emb, mask)
            knn = (base.indices_, base.costs_)
        knn_idx, knn_dist = check_knn(knn, len(emb), k_graph, what)
        indptr, nbr, weight = knn_graph(knn_idx, knn_dist, len(emb))
        LOG.info("%s: graph with %d edges, max degree %d", what, len(nbr) // 2, np.diff(indptr).max())
        indices, costs = bounded_dijkstra(indptr, nbr, weight, trained_ids, k, len(emb),
                                          n_jobs=self.n_jobs, batch_size=self.batch_size, progress=self.progress)
        sample = self._sample_paths(indptr, nbr, weight, trained_ids, len(emb))
        return self._finish(indices, costs, sample, self.cap, k_graph=k_graph)

    def _sample_paths(self, indptr, nbr, weight, trained_ids, vocab_size) -> np.ndarray:
        """Path lengths from a few random trained sources to random trained targets."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import dijkstra

        rng = np.random.default_rng(self.seed)
        graph = csr_matrix((weight + 1e-300, nbr, indptr), shape=(vocab_size, vocab_size))
        sources = rng.choice(trained_ids, min(self.n_cap_sources, len(trained_ids)), replace=False)
        lengths = dijkstra(graph, directed=False, indices=sources)  # (n_cap_sources, V): small
        targets = rng.choice(trained_ids, (len(sources), max(CAP_PAIRS // len(sources), 1)))
        sample = np.take_along_axis(lengths, targets, 1)
        return sample[targets != sources[:, None]]


def bounded_dijkstra(indptr, nbr, weight, sources, k, vocab_size, *, n_jobs=None, batch_size=8192, progress=None):
    """The ``k`` nearest nodes (source excluded) of every source by path length.

    Returns ``(indices (V, k) int64, lengths (V, k) float64)``; rows of non-sources and
    slots beyond a small component stay -1.
    """
    import numba

    kernel = _dijkstra_kernel()
    threads = numba.config.NUMBA_NUM_THREADS if n_jobs in (None, -1) else int(n_jobs)
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    indices = np.full((vocab_size, k), -1, dtype=np.int64)
    lengths = np.zeros((vocab_size, k), dtype=np.float64)
    # Scratch size per thread, a proven bound: a search settles at most k+1 nodes (the source,
    # then k others; it stops at the k-th), each settled node pushes and touches at most
    # max_degree others, and the source is pushed and touched once: heap entries and touched
    # nodes are each <= (k+1)·max_degree + 1. (test_dijkstra_scratch_bound_holds_on_a_star)
    heap_size = (k + 1) * int(np.diff(indptr).max(initial=1)) + 1
    try:
        starts = range(0, len(sources), batch_size)
        for s in progress_bar(starts, progress, desc="bounded Dijkstra", unit="batch"):
            batch = sources[s : s + batch_size].astype(np.int64)
            idx, dist = kernel(indptr, nbr, weight, batch, k, vocab_size, heap_size, 4 * numba.get_num_threads())
            indices[batch], lengths[batch] = idx, dist
    finally:
        numba.set_num_threads(before)
    return indices, lengths


_KERNEL = None


def _dijkstra_kernel():
    """Compile (once, cached on disk) the numba bounded-Dijkstra kernel.

    The heap helpers are bound as module globals, not closure variables: numba's disk
    cache misses on every run for a function that closes over other dispatchers (a
    10 s recompile per process).
    """
    global _KERNEL, _heap_push, _heap_pop
    if _KERNEL is not None:
        return _KERNEL
    from numba import njit, prange

    @njit(cache=True, nogil=True)
    def push(hk, hv, size, key, val):
        pos = size
        while pos > 0:
            up = (pos - 1) >> 1
            if hk[up] <= key:
                break
            hk[pos], hv[pos] = hk[up], hv[up]
            pos = up
        hk[pos], hv[pos] = key, val
        return size + 1

    @njit(cache=True, nogil=True)
    def pop(hk, hv, size):
        size -= 1
        key, val = hk[size], hv[size]
        pos = 0
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            if child + 1 < size and hk[child + 1] < hk[child]:
                child += 1
            if key <= hk[child]:
                break
            hk[pos], hv[pos] = hk[child], hv[child]
            pos = child
        if size > 0:
            hk[pos], hv[pos] = key, val
        return size

    @njit(cache=True, nogil=True, parallel=True)
    def kernel(indptr, nbr, weight, sources, k, vocab_size, heap_size, n_chunks):
        n = len(sources)
        out_idx = np.full((n, k), -1, dtype=np.int64)
        out_len = np.zeros((n, k), dtype=np.float64)
        for chunk in prange(n_chunks):
            dist = np.full(vocab_size, np.inf)
            done = np.zeros(vocab_size, dtype=np.bool_)
            touched = np.empty(heap_size, dtype=np.int64)
            hk = np.empty(heap_size, dtype=np.float64)
            hv = np.empty(heap_size, dtype=np.int64)
            for t in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
                src = sources[t]
                dist[src] = 0.0
                touched[0] = src
                n_touched, size, found = 1, 0, 0
                size = _heap_push(hk, hv, size, 0.0, src)
                while size > 0 and found < k:
                    d, u = hk[0], hv[0]
                    size = _heap_pop(hk, hv, size)
                    if done[u]:
                        continue
                    done[u] = True
                    if u != src:
                        out_idx[t, found], out_len[t, found] = u, d
                        found += 1
                    for e in range(indptr[u], indptr[u + 1]):
                        v = nbr[e]
                        nd = d + weight[e]
                        if not done[v] and nd < dist[v]:
                            if dist[v] == np.inf:
                                touched[n_touched] = v
                                n_touched += 1
                            dist[v] = nd
                            size = _heap_push(hk, hv, size, nd, v)
                for m in range(n_touched):
                    dist[touched[m]] = np.inf
                    done[touched[m]] = False
        return out_idx, out_len

    _heap_push, _heap_pop = push, pop
    _KERNEL = kernel
    return kernel


# -- umap -------------------------------------------------------------------------------
class UmapMetric(_TruncatedMetric):
    """kNN costs in a UMAP embedding of the trained tokens, rescaled to the l2 range.

    Parameters
    ----------
    n_components : int
        Dimension of the UMAP space.
    k : int
        Neighbours kept per token (exact search in the UMAP space).
    n_neighbors : int
        UMAP's neighbourhood size; UMAP is fed the precomputed l2 kNN (``knn=`` or built).
    cap, seed, progress
        As elsewhere; ``seed`` makes UMAP deterministic (and single-threaded).

    Distances in the UMAP space are multiplied by ``scale_`` = p99(l2) / p99(umap) over the
    same random trained pairs, so the cap and the costs are on the l2 scale.
    ``embedding_`` is the (V, n_components) layout with NaN rows for untrained tokens.
    """

    kind = "umap"

    def __init__(self, n_components: int = 8, k: int = 64, n_neighbors: int = 15, cap: float | None = None,
                 seed: int | None = 0, *, n_epochs: int | None = None, progress: bool | None = None):
        self.n_components, self.k, self.n_neighbors, self.cap, self.seed = n_components, k, n_neighbors, cap, seed
        self.n_epochs, self.progress = n_epochs, progress

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "UmapMetric":
        import faiss
        import umap

        what = type(self).__name__
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids = np.flatnonzero(mask)
        n_t = len(trained_ids)
        k = check_k(self.k, n_t, what)
        n_nb = check_k(self.n_neighbors, n_t, what, "n_neighbors")
        if knn is None:
            base = KnnMetric(n_nb - 1, progress=self.progress).fit(emb, mask)
            knn = (base.indices_, base.costs_)
        knn_idx, knn_dist = check_knn(knn, len(emb), n_nb - 1, what)
        unit = normalized(emb)[trained_ids]
        position = np.full(len(emb), -1, dtype=np.int64)
        position[trained_ids] = np.arange(n_t)
        nb = position[knn_idx[trained_ids]]
        if (nb < 0).any():
            raise VocabMetricError(f"{what}: the precomputed knn lists an untrained token or an empty slot")
        # UMAP wants each point as its own first neighbour
        nb = np.hstack([np.arange(n_t)[:, None], nb])
        nd = np.hstack([np.zeros((n_t, 1)), knn_dist[trained_ids]]).astype(np.float32)
        reducer = umap.UMAP(n_components=self.n_components, n_neighbors=n_nb, init="pca", random_state=self.seed,
                            precomputed_knn=(nb, nd), n_epochs=self.n_epochs, verbose=False,
                            tqdm_kwds={"disable": not (self.progress or (self.progress is None and sys.stderr.isatty()))})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(knn_search_index|n_jobs|random_state|force_all_finite|ensure_all_finite).*")
            layout = reducer.fit_transform(unit).astype(np.float32)
        self.embedding_ = np.full((len(emb), self.n_components), np.nan, dtype=np.float32)
        self.embedding_[trained_ids] = layout

        index = faiss.IndexFlatL2(self.n_components)
        index.add(layout)
        _, hits = index.search(layout, k + 1)
        found = drop_self(hits, np.arange(n_t))
        a, b = random_pairs(trained_ids, CAP_PAIRS, self.seed or 0)
        low = np.linalg.norm(self.embedding_[a].astype(np.float64) - self.embedding_[b], axis=1)
        high = _pair_l2(emb, a, b)
        self.scale_ = float(np.quantile(high, CAP_QUANTILE) / max(np.quantile(low, CAP_QUANTILE), 1e-12))
        rows = np.repeat(np.arange(n_t), k)
        lengths = np.linalg.norm(layout[rows].astype(np.float64) - layout[found.ravel()], axis=1) * self.scale_
        indices = np.full((len(emb), k), -1, dtype=np.int64)
        costs = np.zeros((len(emb), k), dtype=np.float64)
        indices[trained_ids] = trained_ids[found]
        costs[trained_ids] = lengths.reshape(n_t, k)
        return self._finish(indices, costs, low * self.scale_, self.cap, n_components=self.n_components,
                            n_neighbors=n_nb, seed=self.seed, scale=self.scale_)


# the tree builders live in their own module (which imports this one); re-exported lazily
# so the pipeline imports one place and either module may be imported first
def __getattr__(name: str) -> Any:
    if name in ("TreeBuilder", "WardTreeBuilder"):
        from . import hierarchy

        return getattr(hierarchy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
