"""The truncated cost :class:`CostOperator`: k neighbours and their costs a token, the cap elsewhere."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import VocabMetricError
from ._checks import _check_dense, check_fingerprint, check_vocab_size

class CostOperator:
    """A truncated sparse ground cost: ``k`` stored neighbours per token, ``cap`` elsewhere.

    Parameters
    ----------
    indices : array-like of int, shape (V, k)
        Neighbour ids of each token; ``-1`` is an empty slot. A row may not list the
        same id twice.
    costs : array-like of float, shape (V, k)
        ``costs[i, m]`` is the cost from token ``i`` to ``indices[i, m]``; finite, >= 0.
        Values in empty slots are ignored.
    cap : float
        The cost of every pair that is not stored (and not on the diagonal);
        must be >= every stored cost.
    fingerprint : str, optional
        The tokenizer fingerprint the operator was built for; checked against logits
        and tokenizers where known.

    Notes
    -----
    A kNN operator is not symmetric (j among i's neighbours does not put i among j's);
    :meth:`symmetrized` makes it so, and debiased Sinkhorn needs that.
    """

    def __init__(self, indices: Any, costs: Any, cap: float, fingerprint: str | None = None):
        indices = np.asarray(indices)
        costs = np.asarray(costs)
        if indices.ndim != 2 or costs.shape != indices.shape:
            raise VocabMetricError(
                f"CostOperator: indices {indices.shape} and costs {costs.shape} must both be "
                "(V, k) arrays of the same shape"
            )
        if not np.issubdtype(indices.dtype, np.integer):
            raise VocabMetricError(f"CostOperator: indices must be integers, got {indices.dtype}")
        vocab_size = indices.shape[0]
        self.indices = np.ascontiguousarray(indices, dtype=np.int32)
        self.costs = np.ascontiguousarray(costs, dtype=np.float32)
        self.cap = float(cap)
        self.fingerprint = fingerprint
        valid = self.indices >= 0
        if self.indices.size and (self.indices.max() >= vocab_size or self.indices.min() < -1):
            bad = np.argwhere((self.indices >= vocab_size) | (self.indices < -1))[0]
            raise VocabMetricError(
                f"CostOperator: indices[{bad[0]}, {bad[1]}] = {self.indices[tuple(bad)]} is out "
                f"of range for V={vocab_size} (use -1 for an empty slot)"
            )
        stored = self.costs[valid]
        if not np.isfinite(self.cap) or self.cap <= 0:
            raise VocabMetricError(f"CostOperator: cap must be finite and > 0, got {cap}")
        if stored.size:
            if not np.all(np.isfinite(stored)) or stored.min() < 0:
                raise VocabMetricError("CostOperator: stored costs must be finite and >= 0")
            if stored.max() > self.cap * (1 + 1e-6):
                raise VocabMetricError(
                    f"CostOperator: cap {self.cap} is below the largest stored cost "
                    f"{stored.max()}; cap must bound every stored cost"
                )
        # empty slots carry cap, so a gather over a row never needs a mask for its value
        self.costs[~valid] = self.cap
        srt = np.sort(np.where(valid, self.indices, -1 - np.arange(self.k)[None, :]), axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if dup.any():
            row = int(np.argwhere(dup)[0, 0])
            raise VocabMetricError(f"CostOperator: row {row} lists the same neighbour twice")

    # -- shape -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def nbytes(self) -> int:
        return self.indices.nbytes + self.costs.nbytes

    def __repr__(self) -> str:
        return (
            f"CostOperator(vocab_size={self.vocab_size}, k={self.k}, cap={self.cap:.4g}, "
            f"stored={int((self.indices >= 0).sum())})"
        )

    # -- queries -----------------------------------------------------------------------
    def cost(self, i: Any, j: Any) -> np.ndarray | float:
        """Cost between tokens ``i`` and ``j`` (ints or broadcastable int arrays).

        O(k) per pair. Returns a float for scalar inputs, else a float32 array.
        """
        scalar = np.ndim(i) == 0 and np.ndim(j) == 0
        i, j = np.broadcast_arrays(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
        for name, a in (("i", i), ("j", j)):
            if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
                raise VocabMetricError(
                    f"CostOperator.cost: {name} out of range [0, {self.vocab_size}): "
                    f"{a.min() if a.min() < 0 else a.max()}"
                )
        rows = self.indices[i]  # (..., k)
        hit = rows == j[..., None]
        out = np.where(hit.any(-1), np.take_along_axis(self.costs[i], hit.argmax(-1)[..., None], -1)[..., 0], self.cap)
        out = np.where(i == j, 0.0, out).astype(np.float32)
        return float(out) if scalar else out

    def neighbors(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored neighbours of token ``i`` as ``(ids, costs)``, cheapest first."""
        if not 0 <= int(i) < self.vocab_size:
            raise VocabMetricError(f"CostOperator.neighbors: id {i} out of range [0, {self.vocab_size})")
        ids, cs = self.indices[i], self.costs[i]
        keep = ids >= 0
        ids, cs = ids[keep], cs[keep]
        order = np.argsort(cs, kind="stable")
        return ids[order], cs[order]

    # -- structure ---------------------------------------------------------------------
    def _coo(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, slots = np.nonzero(self.indices >= 0)
        cols = self.indices[rows, slots].astype(np.int64)
        keep = cols != rows  # the diagonal is 0 by definition, never stored
        return rows[keep].astype(np.int64), cols[keep], self.costs[rows[keep], slots[keep]]

    @property
    def is_symmetric(self) -> bool:
        """True when every stored (i, j, c) has its twin (j, i, c). O(V·k·log)."""
        rows, cols, cs = self._coo()
        V = self.vocab_size
        key = rows * V + cols
        order = np.argsort(key)
        key, cs = key[order], cs[order]
        twin = cols[order] * V + rows[order]
        pos = np.searchsorted(key, twin)
        pos = np.minimum(pos, max(len(key) - 1, 0))
        return bool(len(key) == 0 or (np.all(key[pos] == twin) and np.allclose(cs[pos], cs, rtol=0, atol=1e-7)))

    def symmetrized(self) -> "CostOperator":
        """The union of both directions: cost(i, j) = cost(j, i) = the smaller stored cost.

        Rows are sorted by cost and padded with -1 to the largest degree of the union: k
        out-neighbours plus every token that lists this one, so a "hub" (a token among
        many tokens' k nearest, common in high dimension) widens every row. The result
        takes ``V·max_degree·8`` bytes; ``max_degree`` is between k and V-1.
        O(V·k·log(V·k)) time.
        """
        rows, cols, cs = self._coo()
        rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
        cs = np.concatenate([cs, cs])
        order = np.lexsort((cs, cols, rows))  # by row, then col, then cost
        rows, cols, cs = rows[order], cols[order], cs[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        rows, cols, cs = rows[first], cols[first], cs[first]
        order = np.lexsort((cs, rows))  # cheapest first within a row
        rows, cols, cs = rows[order], cols[order], cs[order]
        return CostOperator(*_pack_rows(rows, cols, cs, self.vocab_size, self.cap), self.cap, self.fingerprint)

    def dense(self) -> np.ndarray:
        """The full (V, V) float32 matrix. Tests only: refuses V > 20000."""
        _check_dense(self.vocab_size, "CostOperator")
        out = np.full((self.vocab_size, self.vocab_size), self.cap, dtype=np.float32)
        rows, cols, cs = self._coo()
        out[rows, cols] = cs
        np.fill_diagonal(out, 0.0)
        return out

    @classmethod
    def from_dense(cls, matrix: Any, k: int, cap: float | None = None, fingerprint: str | None = None) -> "CostOperator":
        """Keep each row's ``k`` cheapest off-diagonal entries of a dense (V, V) cost.

        ``cap`` defaults to the largest entry of ``matrix``. For tests and small V.
        """
        matrix = np.asarray(matrix, dtype=np.float64)
        V = matrix.shape[0]
        work = matrix.copy()
        np.fill_diagonal(work, np.inf)
        k = min(k, V - 1)
        idx = np.argsort(work, axis=1, kind="stable")[:, :k]
        cs = np.take_along_axis(matrix, idx, 1)
        cap = float(matrix.max()) if cap is None else float(cap)
        return cls(idx.astype(np.int32), cs.astype(np.float32), cap, fingerprint)

    def check_vocab(self, vocab_size: int, fingerprint: str | None = None, *, what: str = "CostOperator") -> None:
        """Raise :class:`FingerprintMismatch` unless the operator fits this vocabulary."""
        check_vocab_size(self.vocab_size, vocab_size, what, by="the operator")
        check_fingerprint(self.fingerprint, fingerprint, what)


def _pack_rows(rows: np.ndarray, cols: np.ndarray, cs: np.ndarray, vocab_size: int, cap: float):
    """Scatter row-sorted COO triples into (V, max_degree) arrays padded with -1 / cap."""
    degree = np.bincount(rows, minlength=vocab_size)
    width = max(int(degree.max()) if degree.size else 0, 1)
    start = np.concatenate([[0], np.cumsum(degree)[:-1]])
    slot = np.arange(len(rows)) - start[rows]
    indices = np.full((vocab_size, width), -1, dtype=np.int32)
    costs = np.full((vocab_size, width), cap, dtype=np.float32)
    indices[rows, slot] = cols
    costs[rows, slot] = cs
    return indices, costs
