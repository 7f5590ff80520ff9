"""Unit vectors and the l2 metric between them: the one home of both formulas.

The l2 metric of vocabmetric is the normalized Euclidean distance
``l2(i, j) = ‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` in [0, 2]; the store's exact ``l2`` queries and the
metric builders' stored costs both come from :func:`l2_distance`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)

#: Pairs per block in :func:`l2_distance`: bounds its scratch to a few × 2^16 · d floats.
PAIR_BATCH = 1 << 16


def normalized(vectors: Any) -> np.ndarray:
    """Rows scaled to unit length, ``x_i / ‖x_i‖``, as float32 (n, d); all-zero rows stay zero.

    Computed in the input's precision, then cast. Cost O(n·d).
    """
    vectors = np.asarray(vectors)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32, copy=False)


def l2_distance(vectors: Any, i: Any, j: Any, *, batch: int = PAIR_BATCH) -> np.ndarray | float:
    """Exact normalized Euclidean distance ``‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` in float64.

    ``vectors`` (V, d) are the raw rows (any scale); ``i`` and ``j`` are token ids (ints or
    broadcastable int arrays). Returns a float for two ints, else an array of the broadcast
    shape. Range [0, 2]; an all-zero row is treated as the zero vector.

    Normalized in float64 from the raw rows and computed from the difference, not from
    ``√(2 − 2·cos)``: duplicates give exactly 0 and two rows with the same direction (x and
    3·x) ~1e-16, where the cosine form loses half the digits near 0 (√ of a rounding error).
    Cost O(d) per pair, in blocks of ``batch`` pairs.
    """
    vectors = np.asarray(vectors)
    scalar = np.ndim(i) == 0 and np.ndim(j) == 0
    i, j = np.broadcast_arrays(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
    rows, cols = i.ravel(), j.ravel()
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), batch):
        a = vectors[rows[s : s + batch]].astype(np.float64)
        b = vectors[cols[s : s + batch]].astype(np.float64)
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
        out[s : s + batch] = np.linalg.norm(a - b, axis=1)
    return float(out[0]) if scalar else out.reshape(i.shape)
