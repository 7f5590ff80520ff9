"""The truncated cost :class:`CostOperator`: k neighbours and their costs a token, the cap elsewhere."""

from __future__ import annotations

import threading
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
        self._init_caches()

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
        """True when every stored (i, j, c) has its twin (j, i, c). Two int64 sorts,
        O(V·k·log(V·k)), once per operator (the arrays are not to be modified afterwards)."""
        with self._lock:
            if self._symmetric is None:
                rows, cols, cs = self._coo()
                V = self.vocab_size
                by_key, by_twin = np.argsort(rows * V + cols), np.argsort(cols * V + rows)
                # pair by_key[t] and pair by_twin[t] are each other's twins when the sets match
                self._symmetric = bool(np.array_equal(rows[by_key], cols[by_twin])
                                       and np.array_equal(cols[by_key], rows[by_twin])
                                       and np.allclose(cs[by_key], cs[by_twin], rtol=0, atol=1e-7))
            return self._symmetric

    def symmetrized(self) -> "CostOperator":
        """The union of both directions: cost(i, j) = cost(j, i) = the smaller stored cost.

        Rows are sorted by cost (ties: the larger ids first, each half by id) and padded with
        -1 to the largest degree of the union: k out-neighbours plus every token that lists
        this one, so a "hub" (a token among many tokens' k nearest, common in high dimension)
        widens every row. The result takes ``V·max_degree·8`` bytes; ``max_degree`` is
        between k and V-1. Made once per operator (later calls return it; a symmetric
        operator returns itself): two int64 sorts of the V·k pairs, O(V·k·log(V·k)).
        """
        if self.is_symmetric:
            return self
        with self._lock:
            if self._symmetrized is None:
                self._symmetrized = self._union()
            return self._symmetrized

    def mutual(self) -> "CostOperator":
        """The pairs stored in *both* directions (mutual neighbours): cost(i, j) = cost(j, i) =
        the smaller stored cost; every other pair costs the cap.

        Symmetric like :meth:`symmetrized`, but never wider than k a row: where a hub (a token
        among tens of thousands of tokens' k nearest, as in a model's own embeddings) would pad
        every row of the union to its degree (15–17 GB on SmolLM2-135M's 64-NN), the mutual
        pairs stay O(V·k). What it gives up: a pair only one token lists costs the cap. Rows
        sorted by cost. Two int64 sorts of the V·k pairs, O(V·k·log(V·k)).
        """
        V = self.vocab_size
        rows, cols, cs = self._coo()
        key, twin = rows * V + cols, cols * V + rows
        order = np.argsort(key, kind="stable")
        at = np.minimum(np.searchsorted(key[order], twin), max(len(key) - 1, 0))
        both = key[order][at] == twin if len(key) else np.zeros(0, bool)
        rows, cols = rows[both], cols[both]
        cs = np.minimum(cs[both], cs[order][at[both]])
        order = np.argsort((rows << 32) | cs.astype(np.float32).view(np.uint32).astype(np.int64), kind="stable")
        return CostOperator._checked(*_pack_rows(rows[order], cols[order], cs[order], V, self.cap), self.cap,
                                     self.fingerprint)

    def _union(self) -> "CostOperator":
        V = self.vocab_size
        rows, cols, cs = self._coo()
        lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
        order = np.argsort(lo * V + hi, kind="stable")  # each undirected pair's copies side by side
        lo, hi, cs = lo[order], hi[order], cs[order]
        new = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.zeros(0, bool)
        starts = np.flatnonzero(new)
        cheapest = np.minimum.reduceat(cs, starts) if len(starts) else cs[:0]
        lo, hi = lo[starts], hi[starts]
        rows, cols, cs = np.concatenate([lo, hi]), np.concatenate([hi, lo]), np.concatenate([cheapest, cheapest])
        # by row, then cost: a non-negative float32's bits sort as the float does
        order = np.argsort((rows << 32) | cs.astype(np.float32).view(np.uint32).astype(np.int64), kind="stable")
        sym = CostOperator._checked(*_pack_rows(rows[order], cols[order], cs[order], V, self.cap), self.cap, self.fingerprint)
        sym._symmetric = True
        return sym

    @classmethod
    def _checked(cls, indices: np.ndarray, costs: np.ndarray, cap: float, fingerprint: str | None) -> "CostOperator":
        """An operator from arrays this module made and checked (int32 / float32 (V, k), one
        id per row at most, costs within the cap, empty slots at the cap): no second check,
        which would sort every row again."""
        op = cls.__new__(cls)
        op.indices, op.costs, op.cap, op.fingerprint = indices, costs, float(cap), fingerprint
        op._init_caches()
        return op

    def _init_caches(self) -> None:
        """What is made once per operator, on first use (the arrays are not to be modified)."""
        self._lock = threading.RLock()  # symmetrized() holds it while is_symmetric takes it
        self._symmetric: bool | None = None
        self._symmetrized: CostOperator | None = None

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
