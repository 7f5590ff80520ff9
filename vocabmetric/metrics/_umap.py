"""UMAP costs: kNN distances in a low-dimensional UMAP layout of the trained tokens,
rescaled to the l2 range.

``umap(i, j) = scale · ‖y_i − y_j‖`` where ``y`` is the (V, n_components) layout that UMAP
learns from the precomputed l2 kNN graph and ``scale = p99(l2) / p99(‖y_a − y_b‖)`` over
random trained pairs, so caps and costs sit on the l2 scale.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from .._util.progress import show_progress
from .._util.vectors import l2_distance, normalized
from ..errors import VocabMetricError
from ._checks import (CAP_PAIRS, CAP_QUANTILE, TruncatedMetricBase, argument_where, check_cap, check_flag, check_inputs,
                      check_integer, check_k, check_knn, random_pairs)
from ._knn import KnnMetric, drop_self

LOG = logging.getLogger(__name__)


class UmapMetric(TruncatedMetricBase):
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
    shape, shape_exponent, shape_fraction, shape_rank
        Cost shaping of the stored costs, applied after the cap is set (cap and neighbour
        lists unchanged): :class:`~vocabmetric.metrics.CostShape`; default ``"none"``.

    Distances in the UMAP space are multiplied by ``scale_`` = p99(l2) / p99(umap) over the
    same random trained pairs, so the cap and the costs are on the l2 scale.
    ``embedding_`` is the (V, n_components) layout with NaN rows for untrained tokens.
    """

    kind = "umap"

    def __init__(self, n_components: int = 8, k: int = 64, n_neighbors: int = 15, cap: float | None = None,
                 seed: int | None = 0, *, n_epochs: int | None = None, progress: bool | None = None, shape: str = "none", shape_exponent: float = 1.0,
                 shape_fraction: float = 0.25, shape_rank: int = 10):
        self.n_components, self.k, self.n_neighbors, self.cap, self.seed = n_components, k, n_neighbors, cap, seed
        self.n_epochs, self.progress = n_epochs, progress
        self._set_shape(shape, shape_exponent, shape_fraction, shape_rank)

    def validate(self, where: str | None = None) -> "UmapMetric":
        """Check every argument without embeddings (cheap; ``fit`` calls it first).

        Raises :class:`~vocabmetric.errors.ConfigError` naming the argument and its value,
        prefixed by ``where`` (the config table, ``"[metrics.umap]"``; default: the class name).
        """
        where = argument_where(self, where)
        for name, low in (("n_components", 1), ("k", 1), ("n_neighbors", 2)):
            check_integer(where, name, getattr(self, name), low)
        check_integer(where, "seed", self.seed, 0, unset=True)
        check_integer(where, "n_epochs", self.n_epochs, 1, unset=True)
        check_cap(where, self.cap)
        check_flag(where, "progress", self.progress)
        self.cost_shape().validate(where)
        return self

    def fit(self, embeddings: Any, trained: Any = None, *, knn: Any = None) -> "UmapMetric":
        import faiss
        import umap

        what = type(self).__name__
        self.validate()
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
                            tqdm_kwds={"disable": not show_progress(self.progress)})
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
        high = l2_distance(emb, a, b)
        self.scale_ = float(np.quantile(high, CAP_QUANTILE) / max(np.quantile(low, CAP_QUANTILE), 1e-12))
        rows = np.repeat(np.arange(n_t), k)
        lengths = np.linalg.norm(layout[rows].astype(np.float64) - layout[found.ravel()], axis=1) * self.scale_
        indices = np.full((len(emb), k), -1, dtype=np.int64)
        costs = np.zeros((len(emb), k), dtype=np.float64)
        indices[trained_ids] = trained_ids[found]
        costs[trained_ids] = lengths.reshape(n_t, k)
        return self._finish(indices, costs, low * self.scale_, self.cap, n_components=self.n_components,
                            n_neighbors=n_nb, seed=self.seed, scale=self.scale_)
