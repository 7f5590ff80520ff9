"""The l2 kNN table (faiss) and the symmetrized kNN graph that geodesic, umap and ward read.

:class:`KnnMetric` keeps each token's ``k`` nearest trained tokens by the normalized
Euclidean distance ``‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` (:func:`~vocabmetric._util.vectors.l2_distance`);
:class:`L2Metric` is its exact (flat) table under the name ``l2``. Stored costs are always
the exact float64 l2 distance, whichever index found the neighbours.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._util.progress import progress_bar
from .._util.vectors import l2_distance, normalized, row_distances
from ..errors import ConfigError
from ._checks import (CAP_PAIRS, TruncatedMetricBase, argument_where, check_cap, check_flag, check_inputs, check_integer,
                      check_k, random_pairs)

LOG = logging.getLogger(__name__)

#: Database vectors per BLAS block of the flat search (faiss's default is 1024).
FLAT_DATABASE_BLOCK = 8192


class KnnMetric(TruncatedMetricBase):
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
    shape, shape_exponent, shape_fraction, shape_rank
        Cost shaping of the stored costs, applied after the cap is set (cap and neighbour
        lists unchanged): :class:`~vocabmetric.metrics.CostShape`; default ``"none"``.

    Every kept distance is recomputed in float64 from the vectors; the self hit is dropped
    by id (with duplicate vectors it need not come first), and rows are re-sorted.
    """

    kind = "knn"

    def __init__(self, k: int = 64, index: str = "flat", cap: float | None = None, *, hnsw_m: int = 32,
                 ef_search: int | None = None, batch_size: int = 4096, progress: bool | None = None, seed: int = 0, shape: str = "none", shape_exponent: float = 1.0,
                 shape_fraction: float = 0.25, shape_rank: int = 10):
        self.k, self.index, self.cap = k, index, cap
        self.hnsw_m, self.ef_search, self.batch_size = hnsw_m, ef_search, batch_size
        self.progress, self.seed = progress, seed
        self._set_shape(shape, shape_exponent, shape_fraction, shape_rank)

    def validate(self, where: str | None = None) -> "KnnMetric":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.knn]"``; default: the class name).
        """
        where = argument_where(self, where)
        if self.index not in ("flat", "hnsw"):
            raise ConfigError(f"{where} index must be 'flat' or 'hnsw', got {self.index!r}")
        for name, low in (("k", 1), ("hnsw_m", 1), ("batch_size", 1), ("seed", 0)):
            check_integer(where, name, getattr(self, name), low)
        check_integer(where, "ef_search", self.ef_search, 1, unset=True)
        check_cap(where, self.cap)
        check_flag(where, "progress", self.progress)
        self.cost_shape().validate(where)
        return self

    def fit(self, embeddings: Any, trained: Any = None) -> "KnnMetric":
        what = type(self).__name__
        self.validate()
        emb, mask = check_inputs(embeddings, trained, what)
        trained_ids = np.flatnonzero(mask)
        k = check_k(self.k, len(trained_ids), what)
        found = self._search(normalized(emb[trained_ids]), k)  # positions among trained, -1 = none
        indices = np.full((len(emb), k), -1, dtype=np.int64)
        costs = np.zeros((len(emb), k), dtype=np.float64)
        ids = np.where(found >= 0, trained_ids[np.maximum(found, 0)], -1)
        indices[trained_ids] = ids
        costs[trained_ids] = row_distances(emb, trained_ids, ids)
        a, b = random_pairs(trained_ids, CAP_PAIRS, self.seed)
        return self._finish(indices, costs, l2_distance(emb, a, b), self.cap, index=self.index)

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
        with database_blocks(FLAT_DATABASE_BLOCK):
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


@contextmanager
def database_blocks(size: int):
    """Run faiss's flat (BLAS) search with database blocks of ``size`` vectors, then restore.

    faiss multiplies 4096 queries by 1024 database vectors at a time and merges each block
    into the heaps in an OpenMP loop: larger blocks mean fewer sgemm calls and parallel
    regions (and thread barriers, costly on busy cores). The sets found are the same but for
    float32 near-ties at the k-th place, whose sgemm rounding depends on the blocking (1 of
    3.2M entries at V = 50,000, costs 1e-7 apart). Memory 4096·size·4 bytes. The setting is
    process-global in faiss, hence the restore.
    """
    import faiss

    before = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(before, size)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = before


def knn_graph(knn_idx: np.ndarray, knn_dist: np.ndarray, vocab_size: int):
    """The symmetrized kNN graph as CSR arrays ``(indptr, neighbours, weights)``.

    An edge {i, j} exists when j is among i's neighbours or i among j's; zero-length edges
    (duplicate vectors) are kept (scipy.sparse would drop them). Cost O(V·k·log(V·k)).
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
