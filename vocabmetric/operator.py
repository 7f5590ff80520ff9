"""Truncated ground-cost operators over a vocabulary: never a V×V object.

Two shapes of metric leave the store for training code:

* :class:`CostOperator` — a *truncated* cost. Each token keeps its ``k`` nearest
  neighbours with their costs; every other pair costs ``cap``::

      cost(i, i) = 0
      cost(i, j) = costs[i, m]      where indices[i, m] == j
      cost(i, j) = cap              otherwise

  ``indices`` is ``(V, k) int32`` (``-1`` marks an empty slot, so rows of different
  degree fit one array), ``costs`` is ``(V, k) float32`` and ``cap >= costs.max()``.
  Memory is ``V·k·8`` bytes: 100 MB for V = 100k, k = 128, where the dense matrix
  would be 40 GB.

* :class:`TreeMetric` — a tree over ``n_nodes`` nodes with one leaf per token;
  ``d(i, j)`` is the length of the tree path between the nodes of tokens i and j.
  Memory O(V). :class:`TreeEnsemble` — the mean of T such trees,
  ``d(i, j) = (1/T)·Σ_t d_t(i, j)`` (a metric, though not a tree metric).

Both are numpy-only, so building or serving a metric never imports torch; the
penalties in :mod:`vocabmetric.regularizers` make the tensors they need.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import FingerprintMismatch, VocabMetricError

#: Largest vocabulary for which ``dense()`` will build a V×V matrix (1.6 GB in float32).
DENSE_LIMIT = 20000


def _check_dense(vocab_size: int, what: str) -> None:
    if vocab_size > DENSE_LIMIT:
        raise VocabMetricError(
            f"{what}.dense() refuses V={vocab_size}: a {vocab_size}×{vocab_size} matrix is "
            f"{vocab_size**2 * 4 / 1e9:.1f} GB. dense() is for tests with V <= {DENSE_LIMIT}; "
            "use cost(i, j) or neighbors(i) instead."
        )


def check_vocab_size(covered: int, width: int, what: str, *, by: str = "the metric") -> None:
    """Raise :class:`FingerprintMismatch` unless logits of ``width`` entries fit a metric
    over ``covered`` token ids."""
    if width != covered:
        raise FingerprintMismatch(
            f"{what}: logits have {width} entries in their last dimension but {by} covers "
            f"{covered} token ids; it was built for another tokenizer "
            "(check `vocabmetric info STORE` against your model's vocabulary size)"
        )


def check_fingerprint(expected: str | None, got: str | None, what: str) -> None:
    """Raise :class:`FingerprintMismatch` when both fingerprints are known and differ."""
    if expected and got and expected != got:
        raise FingerprintMismatch(
            f"{what}: operator fingerprint {expected[:12]}… does not match {got[:12]}…; "
            "the metric was built for another tokenizer. Build one for this tokenizer "
            "(`vocabmetric build`)."
        )


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


class TreeMetric:
    """A tree metric over the vocabulary: d(i, j) = length of the tree path between
    the nodes of tokens i and j.

    Parameters
    ----------
    parent : array-like of int, shape (n_nodes,)
        ``parent[v]`` is v's parent; ``parent[root] = -1`` (exactly one root).
    weight : array-like of float, shape (n_nodes,)
        ``weight[v]`` is the length of the edge from v up to ``parent[v]`` (0 for the root).
    leaf_of_token : array-like of int, shape (V,)
        The node of token i.

    The exact W1 distance under this metric is ``Σ_v weight[v]·|P(Γ(v)) − Q(Γ(v))|``
    (Γ(v): the tokens below v), which `vocabmetric.regularizers.TreeWasserstein` computes.
    Memory O(n_nodes + V); ``distance`` is O(depth) per pair.
    """

    def __init__(self, parent: Any, weight: Any, leaf_of_token: Any, fingerprint: str | None = None):
        self.parent = np.ascontiguousarray(parent, dtype=np.int64)
        self.weight = np.ascontiguousarray(weight, dtype=np.float64)
        self.leaf_of_token = np.ascontiguousarray(leaf_of_token, dtype=np.int64)
        self.fingerprint = fingerprint
        n = len(self.parent)
        if self.parent.ndim != 1 or self.weight.shape != self.parent.shape or self.leaf_of_token.ndim != 1:
            raise VocabMetricError(
                f"TreeMetric: parent {self.parent.shape} and weight {self.weight.shape} must be "
                f"(n_nodes,), leaf_of_token {self.leaf_of_token.shape} must be (V,)"
            )
        roots = np.flatnonzero(self.parent == -1)
        if len(roots) != 1:
            raise VocabMetricError(f"TreeMetric: expected exactly one root (parent == -1), found {len(roots)}")
        if n and (self.parent.max() >= n or self.parent.min() < -1):
            raise VocabMetricError(f"TreeMetric: parent ids must lie in [-1, {n})")
        if not np.all(np.isfinite(self.weight)) or self.weight.min(initial=0) < 0:
            raise VocabMetricError("TreeMetric: weights must be finite and >= 0")
        if self.leaf_of_token.size and (self.leaf_of_token.min() < 0 or self.leaf_of_token.max() >= n):
            raise VocabMetricError(f"TreeMetric: leaf_of_token must lie in [0, {n})")
        self.root = int(roots[0])
        self.weight[self.root] = 0.0
        self.depth, self.dist_to_root = self._depths()

    def _depths(self) -> tuple[np.ndarray, np.ndarray]:
        """Depth and root distance of every node, by pointer jumping: O(n·log depth)."""
        n = len(self.parent)
        anc = np.where(self.parent < 0, np.arange(n), self.parent)  # the root points to itself
        depth = (self.parent >= 0).astype(np.int64)  # steps from v up to anc[v]
        dist = self.weight.copy()  # length from v up to anc[v]
        for _ in range(64):  # 2**64 > any depth; on a cycle anc never becomes the root
            if np.all(anc == self.root):
                return depth, dist
            depth, dist, anc = depth + depth[anc], dist + dist[anc], anc[anc]
        raise VocabMetricError("TreeMetric: parent has a cycle (some node never reaches the root)")

    @property
    def vocab_size(self) -> int:
        return len(self.leaf_of_token)

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def trees(self) -> tuple["TreeMetric", ...]:
        """``(self,)``: a tree is an ensemble of one (see :class:`TreeEnsemble`)."""
        return (self,)

    n_trees = 1

    def __repr__(self) -> str:
        return f"TreeMetric(vocab_size={self.vocab_size}, n_nodes={self.n_nodes}, depth={int(self.depth.max())})"

    def lca(self, a: Any, b: Any) -> np.ndarray:
        """Lowest common ancestor of nodes ``a`` and ``b`` (broadcast int arrays). O(depth)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.copy(), b.copy()
        while True:
            deeper_a = self.depth[a] > self.depth[b]
            deeper_b = self.depth[b] > self.depth[a]
            same_depth_diff = (~deeper_a) & (~deeper_b) & (a != b)
            if not (deeper_a.any() or deeper_b.any() or same_depth_diff.any()):
                return a
            a = np.where(deeper_a | same_depth_diff, self.parent[a], a)
            b = np.where(deeper_b | same_depth_diff, self.parent[b], b)

    def distance(self, i: Any, j: Any) -> np.ndarray | float:
        """Tree-path length between tokens ``i`` and ``j`` (ints or broadcast int arrays)."""
        scalar = np.ndim(i) == 0 and np.ndim(j) == 0
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        for name, t in (("i", i), ("j", j)):
            if t.size and (t.min() < 0 or t.max() >= self.vocab_size):
                raise VocabMetricError(f"TreeMetric.distance: {name} out of range [0, {self.vocab_size})")
        a, b = self.leaf_of_token[i], self.leaf_of_token[j]
        d = self.dist_to_root[a] + self.dist_to_root[b] - 2 * self.dist_to_root[self.lca(a, b)]
        d = np.maximum(d, 0.0)
        return float(d) if scalar else d

    def dense(self) -> np.ndarray:
        """The full (V, V) distance matrix. Tests only: refuses V > 20000."""
        _check_dense(self.vocab_size, "TreeMetric")
        ids = np.arange(self.vocab_size)
        return self.distance(ids[:, None], ids[None, :])

    def check_vocab(self, vocab_size: int, fingerprint: str | None = None, *, what: str = "TreeMetric") -> None:
        """Raise :class:`FingerprintMismatch` unless the tree fits this vocabulary."""
        check_vocab_size(self.vocab_size, vocab_size, what, by="the tree")
        check_fingerprint(self.fingerprint, fingerprint, what)


class TreeEnsemble:
    """The mean of T tree metrics over one vocabulary: ``d(i, j) = (1/T)·Σ_t d_t(i, j)``.

    Its W1 penalty is the tree-sliced ``W_T = (1/T)·Σ_t W_t`` (Le et al. 2019), which
    :class:`~vocabmetric.regularizers.TreeWasserstein` computes in one pass over all trees.
    ``distance`` is O(T·depth) per pair; memory the trees'.

    The stacked arrays (the store's layout): ``parent``, ``weight`` (Σ_t n_nodes_t,), node
    ids local to each tree; ``leaf_of_token`` (T, V); ``offsets`` (T+1,): tree t is
    ``parent[offsets[t]:offsets[t+1]]``.
    """

    def __init__(self, trees: Any, fingerprint: str | None = None):
        self.trees = tuple(trees)
        if not self.trees or not all(isinstance(t, TreeMetric) for t in self.trees):
            raise VocabMetricError("TreeEnsemble: expected one or more TreeMetrics")
        sizes = {t.vocab_size for t in self.trees}
        prints = {t.fingerprint for t in self.trees} - {None}
        if len(sizes) > 1 or len(prints) > 1 or (fingerprint and prints - {fingerprint}):
            raise VocabMetricError(f"TreeEnsemble: the trees cover different vocabularies (sizes {sorted(sizes)}, "
                                   f"{len(prints)} fingerprints); build them for one tokenizer")
        self.fingerprint = fingerprint or next(iter(prints), None)

    @classmethod
    def from_arrays(cls, parent: Any, weight: Any, leaf_of_token: Any, offsets: Any,
                    fingerprint: str | None = None) -> "TreeEnsemble":
        """The ensemble of the stacked arrays (see the class docstring)."""
        leaf = np.atleast_2d(np.asarray(leaf_of_token))
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) != len(leaf) + 1 or offsets[0] != 0 or offsets[-1] != len(parent) or np.any(np.diff(offsets) < 1):
            raise VocabMetricError(f"TreeEnsemble: offsets {offsets.tolist()[:8]} do not split {len(parent)} nodes "
                                   f"into {len(leaf)} trees")
        return cls([TreeMetric(parent[a:b], weight[a:b], leaf[t], fingerprint)
                    for t, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))], fingerprint)

    @property
    def parent(self) -> np.ndarray:
        return np.concatenate([t.parent for t in self.trees])

    @property
    def weight(self) -> np.ndarray:
        return np.concatenate([t.weight for t in self.trees])

    @property
    def leaf_of_token(self) -> np.ndarray:
        return np.stack([t.leaf_of_token for t in self.trees])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([t.n_nodes for t in self.trees])]).astype(np.int64)

    @property
    def n_trees(self) -> int:
        return len(self.trees)

    @property
    def vocab_size(self) -> int:
        return self.trees[0].vocab_size

    def __repr__(self) -> str:
        return f"TreeEnsemble(n_trees={self.n_trees}, vocab_size={self.vocab_size})"

    def distance(self, i: Any, j: Any) -> np.ndarray | float:
        """Mean tree-path length between tokens ``i`` and ``j`` (ints or broadcast int arrays)."""
        total = sum(np.asarray(t.distance(i, j), dtype=np.float64) for t in self.trees) / self.n_trees
        return float(total) if np.ndim(total) == 0 else total

    def dense(self) -> np.ndarray:
        """The full (V, V) mean distance matrix. Tests only: refuses V > 20000."""
        _check_dense(self.vocab_size, "TreeEnsemble")
        return sum(t.dense() for t in self.trees) / self.n_trees

    def check_vocab(self, vocab_size: int, fingerprint: str | None = None, *, what: str = "TreeEnsemble") -> None:
        """Raise :class:`FingerprintMismatch` unless the trees fit this vocabulary."""
        check_vocab_size(self.vocab_size, vocab_size, what, by="the trees")
        check_fingerprint(self.fingerprint, fingerprint, what)
