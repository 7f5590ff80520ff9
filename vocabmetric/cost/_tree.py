"""Tree metrics: :class:`TreeMetric` (a path length on one tree) and :class:`TreeEnsemble`
(the mean over T trees)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import VocabMetricError
from ._checks import _check_dense, check_fingerprint, check_vocab_size

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

    def distances_from(self, i: int) -> np.ndarray:
        """``distance(i, j)`` for every token j, (V,) float64, the same values: O(n_nodes).

        No LCA per pair: each node's meeting point with ``i``'s root path is carried down
        the tree one level at a time (a node on the path meets it at itself, any other node
        where its parent does), then ``d(i, j) = r(a) + r(b) − 2·r(meet(b))`` with ``r`` the
        distance to the root, ``a``, ``b`` the tokens' nodes.
        """
        if not 0 <= int(i) < self.vocab_size:
            raise VocabMetricError(f"TreeMetric.distances_from: i out of range [0, {self.vocab_size})")
        a = int(self.leaf_of_token[int(i)])
        on_path = np.zeros(self.n_nodes, dtype=bool)
        while a >= 0:
            on_path[a] = True
            a = int(self.parent[a])
        meet = np.zeros(self.n_nodes, dtype=np.float64)  # r(lca(node of i, v)) for every node v
        for level in self._levels():
            meet[level] = np.where(on_path[level], self.dist_to_root[level], meet[self.parent[level]])
        a, b = self.leaf_of_token[int(i)], self.leaf_of_token
        return np.maximum(self.dist_to_root[a] + self.dist_to_root[b] - 2 * meet[b], 0.0)

    def _levels(self) -> list[np.ndarray]:
        """Node ids by depth, the root's level first; made once, O(n_nodes·log)."""
        levels = self.__dict__.get("_by_depth")
        if levels is None:
            order = np.argsort(self.depth, kind="stable")
            levels = np.split(order, np.cumsum(np.bincount(self.depth))[:-1])
            self.__dict__["_by_depth"] = levels
        return levels

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

    def distances_from(self, i: int) -> np.ndarray:
        """``distance(i, j)`` for every token j, (V,) float64: O(Σ_t n_nodes_t)."""
        return sum(t.distances_from(i) for t in self.trees) / self.n_trees

    def dense(self) -> np.ndarray:
        """The full (V, V) mean distance matrix. Tests only: refuses V > 20000."""
        _check_dense(self.vocab_size, "TreeEnsemble")
        return sum(t.dense() for t in self.trees) / self.n_trees

    def check_vocab(self, vocab_size: int, fingerprint: str | None = None, *, what: str = "TreeEnsemble") -> None:
        """Raise :class:`FingerprintMismatch` unless the trees fit this vocabulary."""
        check_vocab_size(self.vocab_size, vocab_size, what, by="the trees")
        check_fingerprint(self.fingerprint, fingerprint, what)
