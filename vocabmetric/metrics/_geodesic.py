"""Geodesic costs: shortest-path length on the symmetrized kNN graph, by bounded Dijkstra.

``geodesic(i, j)`` = the length of the shortest path from i to j whose edges are kNN edges
weighted by their exact l2 length (:func:`~vocabmetric.metrics.knn_graph`). Each trained
token keeps its ``k`` nearest by path length; the search from a source stops once ``k``
nodes are settled, so no V×V object is ever built.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._util.jit import compile_once
from .._util.progress import progress_bar
from ._checks import (CAP_PAIRS, TruncatedMetricBase, argument_where, check_cap, check_flag, check_inputs, check_integer,
                      check_k, check_knn)
from ._knn import KnnMetric, knn_graph

LOG = logging.getLogger(__name__)


class GeodesicMetric(TruncatedMetricBase):
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
    shape, shape_exponent, shape_fraction, shape_rank
        Cost shaping of the stored costs, applied after the cap is set (cap and neighbour
        lists unchanged): :class:`~vocabmetric.metrics.CostShape`; default ``"none"``.

    Bounded Dijkstra from every trained source stops after ``k`` settled nodes besides the
    source: O(k·deg·log(k·deg)) per source, O(V·k) memory in all; no V×V object. The
    kernel is compiled with numba (a dependency of umap-learn) and runs sources in
    parallel threads: compiled code holds no GIL, so threads scale like processes without
    copying the graph into each worker.
    """

    kind = "geodesic"

    def __init__(self, k_graph: int = 10, k: int = 128, cap: float | None = None, n_jobs: int | None = None, *,
                 batch_size: int = 8192, n_cap_sources: int = 16, progress: bool | None = None, seed: int = 0, shape: str = "none", shape_exponent: float = 1.0,
                 shape_fraction: float = 0.25, shape_rank: int = 10):
        self.k_graph, self.k, self.cap, self.n_jobs = k_graph, k, cap, n_jobs
        self.batch_size, self.n_cap_sources, self.progress, self.seed = batch_size, n_cap_sources, progress, seed
        self._set_shape(shape, shape_exponent, shape_fraction, shape_rank)

    def validate(self, where: str | None = None) -> "GeodesicMetric":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.geodesic]"``; default: the class name).
        """
        where = argument_where(self, where)
        for name, low in (("k_graph", 1), ("k", 1), ("batch_size", 1), ("n_cap_sources", 1), ("seed", 0)):
            check_integer(where, name, getattr(self, name), low)
        check_integer(where, "n_jobs", self.n_jobs, 1, unset=True, also=(-1,))
        check_cap(where, self.cap)
        check_flag(where, "progress", self.progress)
        self.cost_shape().validate(where)
        return self

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "GeodesicMetric":
        what = type(self).__name__
        self.validate()
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

    kernel = dijkstra_kernel()
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


@compile_once
def dijkstra_kernel(numba):
    """Compile (once, cached on disk) the numba bounded-Dijkstra kernel.

    ``kernel(indptr, nbr, weight, sources, k, vocab_size, heap_size, n_chunks)`` →
    ``(indices (n, k) int64, lengths (n, k) float64)`` for the ``n`` sources, run in
    ``n_chunks`` parallel chunks. The heap helpers are bound as module globals, not closure
    variables: numba's disk cache misses on every run for a function that closes over other
    dispatchers (a 10 s recompile per process).
    """
    global _heap_push, _heap_pop
    njit, prange = numba.njit, numba.prange

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
    return kernel
