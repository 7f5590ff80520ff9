"""Unit vectors and the l2 metric between them: the one home of both formulas.

The l2 metric of vocabmetric is the normalized Euclidean distance
``l2(i, j) = ‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` in [0, 2]; the store's exact ``l2`` queries and the
metric builders' stored costs both come from :func:`l2_distance`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import ConfigError

LOG = logging.getLogger(__name__)

#: Pairs per block in :func:`l2_distance`: bounds its scratch to a few × 2^16 · d floats.
PAIR_BATCH = 1 << 16
#: Rows per block of :func:`row_distances`: a (block, k, d) float64 difference, ~16 MB at k=64, d=128.
ROW_BLOCK = 256


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
        a, b = _unit64(vectors[rows[s : s + batch]]), _unit64(vectors[cols[s : s + batch]])
        out[s : s + batch] = np.linalg.norm(a - b, axis=1)
    return float(out[0]) if scalar else out.reshape(i.shape)


def row_distances(vectors: np.ndarray, rows: np.ndarray, neighbours: np.ndarray, *, block: int = ROW_BLOCK) -> np.ndarray:
    """``l2_distance(vectors, rows[:, None], neighbours)`` with each row normalized once: (n, k).

    ``neighbours`` (n, k) are token ids, -1 = none (distance 0). The same float64 arithmetic
    as :func:`~vocabmetric._util.vectors.l2_distance` (bit-identical results), but the rows are
    normalized once rather than once per pair, and each row's vector is broadcast against its
    k neighbours instead of gathered k times. Cost O(n·k·d); memory V·d·8 bytes plus a block.
    """
    unit = _unit64(np.asarray(vectors))
    out = np.zeros(neighbours.shape, dtype=np.float64)
    for s in range(0, len(rows), block):
        nbr = neighbours[s : s + block]
        diff = unit[rows[s : s + block], None, :] - unit[np.maximum(nbr, 0)]
        out[s : s + block] = np.where(nbr >= 0, np.linalg.norm(diff, axis=-1), 0.0)
    return out


def require_finite_rows(block: np.ndarray, first_row: int, where: str, remedy: str) -> None:
    """Raise :class:`ConfigError` naming the first row of ``block`` (rows ``first_row…``) with NaN or inf.

    ``where`` names the file and tensor; ``remedy`` says what to do. Cost O(rows·d).
    """
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise ConfigError(f"{where} row {row} (token id {row}) holds NaN or inf; {remedy}")


def _unit64(rows: np.ndarray) -> np.ndarray:
    """A float64 copy of ``rows`` scaled to unit length (an all-zero row stays zero): the
    normalization both distances above compute in."""
    unit = rows.astype(np.float64)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-300)
    return unit
