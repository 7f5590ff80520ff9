"""Tree-Wasserstein distance between next-token distributions: exact W1 in closed form.

For a tree metric (``d(i, j)`` = length of the tree path between the nodes of tokens i and
j, see :class:`~vocabmetric.cost.TreeMetric`) optimal transport has a closed form
(Evans & Matsen 2012; Le et al. 2019):

.. math::

    W_1(p, q) = \\sum_{v ≠ root} w_v \\, |P(Γ(v)) − Q(Γ(v))|,

``w_v`` the length of the edge from v up to its parent and ``Γ(v)`` the tokens in the
subtree of v. No solver, no V×V object: the subtree masses ``D_v = P(Γ(v)) − Q(Γ(v))`` are
one bottom-up sweep over the nodes (children before parents), O(V + n_nodes) per position.

Gradient (a subgradient: ``sign(0) = 0``, so it is exactly 0 at ``p = q``):

.. math::

    ∂W/∂p_i = \\sum_{v ∋ i} w_v \\, \\mathrm{sign}(D_v) =: g_i,\\qquad
    ∂W/∂z = p ⊙ (g − ⟨p, g⟩)

— a top-down prefix sum of ``w_v·sign(D_v)`` along the root-to-leaf paths, one more sweep.
Both sweeps run inside the forward pass, position chunk by chunk while the chunk is in
cache, and the backward pass only scales the saved ``∂W/∂z``.

Layout: nodes that hold exactly one token and have no children ("private leaves", every
token under :class:`~vocabmetric.metrics.TreeBuilder`) are not materialized; their mass
is ``p_i − q_i`` itself. The other ("inner") nodes are ordered deepest first, so one pass in
that order adds every node into its parent after all its children were added to it.

Several trees (a :class:`~vocabmetric.cost.TreeEnsemble`): ``W_T = (1/T)·Σ_t W_t``
is again a sum of ``w·|D|`` over edges — the edges of all trees, each weight divided by T —
so the trees' inner nodes are concatenated into one layout and swept in the same one pass.

Two backends compute the same thing: ``"numba"`` (CPU; one fused loop per block of
:data:`BLOCK` positions, compiled on first use and cached, float64 accumulation) and
``"torch"`` (any device; ``index_add_`` per tree level). On the CPU the cost is the
random access of a token's node in each tree (T·n_placed per position): the numba kernel
reads and writes a node's whole block of positions in one access and prefetches the
nodes a few tokens ahead.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..cost import TreeEnsemble, TreeMetric
from ._chunks import solve_by_chunks
from ._inputs import Reference
from ._numba import compile_once, prefetch as _prefetch, run_rows
from ._penalty import NUMBA_BACKENDS as BACKENDS, Penalty


class TreeLayout:
    """One tree, or T trees averaged, rearranged for the two sweeps (numpy; built once).

    The trees' inner nodes are concatenated into one array, every edge weight divided by T,
    so that one pass computes ``W_T = (1/T)·Σ_t W_t`` (the mean of per-tree W1s). A token
    sends its mass to one inner node per tree (a CSR list); targets that are a root are
    dropped (a root has no edge, and ``G = 0`` there), so an untrained token hung under
    every root costs one ``|d|`` and nothing else.

    Attributes
    ----------
    token_weight : (V,) float64
        ``(1/T)·Σ_t w_t`` of the token's node where it is a private leaf (0 elsewhere).
    target_start, target : (V+1,), (n_targets,) int64
        Token i sends its mass to inner nodes ``target[target_start[i]:target_start[i+1]]``.
    target_token : (n_targets,) int64
        The token of each target entry (the torch backend's gather).
    inner_parent : (n_inner,) int64
        Inner index of each inner node's parent (``-1`` for the roots, which come last).
    inner_weight : (n_inner,) float64
        Edge length / T of each inner node (0 for the roots).
    n_roots : int
        The number of trees; the last ``n_roots`` inner nodes are their roots.
    levels : list of (start, stop)
        Inner nodes of one depth, deepest first (all trees together); the roots' level is the last.
    """

    def __init__(self, trees: Sequence[TreeMetric]):
        n_trees, vocab_size = len(trees), trees[0].vocab_size
        scale = 1.0 / n_trees
        self.token_weight = np.zeros(vocab_size)
        parents, weights, depths, targets, tokens, offset = [], [], [], [], [], 0
        for tree in trees:
            leaf = tree.leaf_of_token
            tokens_at = np.bincount(leaf, minlength=tree.n_nodes)
            children = np.bincount(tree.parent[tree.parent >= 0], minlength=tree.n_nodes)
            private = (tokens_at == 1) & (children == 0)
            private[tree.root] = False
            inner_nodes = np.flatnonzero(~private)
            inner_of = np.full(tree.n_nodes, -1, dtype=np.int64)
            inner_of[inner_nodes] = offset + np.arange(len(inner_nodes))
            parent = tree.parent[inner_nodes]
            parents.append(np.where(parent >= 0, inner_of[np.maximum(parent, 0)], -1))
            weights.append(np.where(parent >= 0, tree.weight[inner_nodes] * scale, 0.0))
            depths.append(tree.depth[inner_nodes])
            is_private = private[leaf]
            self.token_weight += np.where(is_private, tree.weight[leaf] * scale, 0.0)
            target = np.where(is_private, tree.parent[leaf], leaf)  # a node; the root when it is one
            keep = target != tree.root
            targets.append(inner_of[target[keep]])
            tokens.append(np.flatnonzero(keep))
            offset += len(inner_nodes)
        depth = np.concatenate(depths)
        order = np.argsort(-depth, kind="stable")  # deepest first; the roots (depth 0) last
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        parent = np.concatenate(parents)[order]
        self.inner_parent = np.where(parent >= 0, rank[np.maximum(parent, 0)], -1)
        self.inner_weight = np.concatenate(weights)[order]
        token, target = np.concatenate(tokens), rank[np.concatenate(targets)]
        by_token = np.argsort(token, kind="stable")
        self.target_token, self.target = token[by_token], target[by_token]
        self.target_start = np.concatenate([[0], np.cumsum(np.bincount(token, minlength=vocab_size))]).astype(np.int64)
        cuts = np.flatnonzero(np.diff(depth[order])) + 1
        bounds = np.concatenate([[0], cuts, [len(order)]])
        self.levels = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.vocab_size, self.n_inner, self.n_roots = vocab_size, len(order), n_trees

    def torch_tables(self, device: Any, dtype: torch.dtype) -> dict:
        as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        return {
            "token_weight": as_t(self.token_weight, dtype),
            "target": as_t(self.target, torch.int64),
            "target_token": as_t(self.target_token, torch.int64),
            "inner_parent": as_t(np.maximum(self.inner_parent, 0), torch.int64),
            "inner_weight": as_t(self.inner_weight, dtype),
        }


# -- numba backend ---------------------------------------------------------------------------
#: Positions swept together by the numba kernel: the inner nodes' masses of a block are
#: ``(n_inner, BLOCK)``, so one random access of a token's node serves the whole block.
#: Measured on the demo store's 8 trees (182k inner nodes), ms per position at 2 threads:
#: 1 → 2.34, 2 → 1.86, 4 → 1.27, 8 → 4.03 (two threads' 8-wide scratch, 23 MB, no longer
#: stays in cache); at 1 thread 4 is best too.
BLOCK = 4
#: Target entries ahead whose node the token passes prefetch (the accesses are random:
#: without the hint the scatter waits on memory; measured 4× faster on the demo store's 8 trees).
PREFETCH = 32


@compile_once
def _numba_kernel(numba):
    """The fused sweep over all trees, :data:`BLOCK` positions at a time (cached on disk;
    serial and GIL-free: :func:`~._numba.run_rows` spreads positions over threads).

    Per block: one pass over the tokens scatters ``d_i = p_i − q_i`` of every position into
    the token's inner nodes (``mass[node, position]``, float64); one pass over the inner
    nodes, deepest first, adds each into its parent and sums ``w·|D|``; for the gradient one
    pass top-down turns ``D_v`` into ``Σ_{u ⪰ v} w_u sign(D_u)`` and one pass over the
    tokens gathers ``g_i``. The random accesses (a node's entry) are per block, not per
    position: ~BLOCK× fewer cache misses than one position at a time.
    """
    block, ahead = BLOCK, PREFETCH
    prefetch = _prefetch()

    @numba.njit(cache=True, nogil=True)
    def tree_rows(p, q, value, dz, token_weight, target_start, target, inner_parent, inner_weight, n_roots, want_grad):
        n, vocab_size = p.shape
        n_inner = inner_parent.shape[0]
        n_edges = n_inner - n_roots
        last_target, last_edge = target.shape[0] - ahead, n_edges - ahead
        mass = np.empty((n_inner, block), dtype=np.float64)
        d = np.empty(block, dtype=np.float64)
        g = np.empty(block, dtype=np.float64)
        total = np.empty(block, dtype=np.float64)
        mean = np.empty(block, dtype=np.float64)
        row = np.empty(block, dtype=np.int64)
        for r0 in range(0, n, block):
            rows = min(block, n - r0)
            for k in range(block):  # a short block sweeps its last row again (fixed-width loops)
                row[k] = min(r0 + k, n - 1)
            mass[:, :] = 0.0
            total[:] = 0.0
            for i in range(vocab_size):  # private leaves, and the mass of every token
                w = token_weight[i]
                for k in range(block):
                    d[k] = np.float64(p[row[k], i]) - np.float64(q[row[k], i])
                    total[k] += w * abs(d[k])
                for s in range(target_start[i], target_start[i + 1]):
                    if s < last_target:
                        prefetch(mass, target[s + ahead], 0)
                    t = target[s]
                    for k in range(block):
                        mass[t, k] += d[k]
            for v in range(n_edges):  # bottom-up: children come before parents
                if v < last_edge:
                    prefetch(mass, inner_parent[v + ahead], 0)
                u, w = inner_parent[v], inner_weight[v]
                for k in range(block):
                    m = mass[v, k]
                    mass[u, k] += m
                    total[k] += w * abs(m)
            for k in range(rows):
                value[r0 + k] = total[k]
            if not want_grad:
                continue
            for v in range(n_edges, n_inner):  # roots: G = 0
                for k in range(block):
                    mass[v, k] = 0.0
            for v in range(n_edges - 1, -1, -1):  # top-down: parents before children
                if v >= ahead:
                    prefetch(mass, inner_parent[v - ahead], 0)
                u, w = inner_parent[v], inner_weight[v]
                for k in range(block):
                    m = mass[v, k]
                    mass[v, k] = w * (np.float64(m > 0) - np.float64(m < 0)) + mass[u, k]
            mean[:] = 0.0
            for i in range(vocab_size):
                w = token_weight[i]
                for k in range(block):
                    dk = np.float64(p[row[k], i]) - np.float64(q[row[k], i])
                    g[k] = w * (np.float64(dk > 0) - np.float64(dk < 0))
                for s in range(target_start[i], target_start[i + 1]):
                    if s < last_target:
                        prefetch(mass, target[s + ahead], 0)
                    t = target[s]
                    for k in range(block):
                        g[k] += mass[t, k]
                for k in range(block):  # a repeated row writes what its original writes
                    dz[row[k], i] = g[k]
                    mean[k] += p[row[k], i] * g[k]
            for k in range(rows):
                for i in range(vocab_size):
                    dz[r0 + k, i] = p[r0 + k, i] * (dz[r0 + k, i] - mean[k])

    return tree_rows


def _chunk_numba(layout: TreeLayout, p, q, value, dz) -> None:
    """Write the chunk's values into ``value`` (n,) and, unless None, ``∂W/∂z`` into ``dz``."""
    dz_rows = dz.numpy() if dz is not None else np.empty((p.shape[0], 0), dtype=p.numpy().dtype)
    run_rows(_numba_kernel(), (p.numpy(), q.numpy(), value.numpy(), dz_rows),
             (layout.token_weight, layout.target_start, layout.target, layout.inner_parent, layout.inner_weight,
              layout.n_roots, dz is not None))


# -- torch backend ---------------------------------------------------------------------------
def _chunk_torch(layout: TreeLayout, tables: dict, p, q, value_out, dz_out) -> None:
    d = p - q
    value = d.abs() @ tables["token_weight"]
    mass = torch.zeros(p.shape[0], layout.n_inner, dtype=p.dtype, device=p.device)
    mass.index_add_(1, tables["target"], d[:, tables["target_token"]])
    parent, weight = tables["inner_parent"], tables["inner_weight"]
    for start, stop in layout.levels[:-1]:  # deepest first; the roots are the last level
        mass.index_add_(1, parent[start:stop], mass[:, start:stop].clone())  # no aliasing: parents lie in later levels
    value_out.copy_(value + mass.abs() @ weight)
    if dz_out is None:
        return
    path = torch.sign(mass).mul_(weight)  # w_v·sign(D_v); 0 at the roots
    for start, stop in reversed(layout.levels[:-1]):  # top-down
        path[:, start:stop] += path[:, parent[start:stop]]
    g = torch.sign(d).mul_(tables["token_weight"])
    g.index_add_(1, tables["target_token"], path[:, tables["target"]])
    mean = (p * g).sum(-1, keepdim=True)
    torch.mul(g.sub_(mean), p, out=dz_out)


class TreeWasserstein(Penalty):
    """Exact W1 for a tree metric, per position: ``Σ_{v≠root} w_v |P(Γ(v)) − Q(Γ(v))|``.

    Parameters
    ----------
    tree : TreeMetric, TreeEnsemble or sequence of TreeMetric
        ``parent``, ``weight``, ``leaf_of_token`` over the vocabulary (V tokens); several
        tokens may share a node, and tokens may sit on internal nodes. With T trees the
        penalty is the mean of their W1s, ``W_T = (1/T)·Σ_t W_t`` (tree-sliced Wasserstein,
        Le et al. 2019), computed in one pass over all trees' nodes.
    backend : {"auto", "numba", "torch"}
        ``"auto"``: numba for CPU tensors when numba imports, torch otherwise (GPU).
    chunk_size : int, optional
        Positions per chunk; default ≈ 2**22 / V.

    Shapes
    ------
    ``forward(logits [..., V], ref, *, fingerprint=None)`` → ``[...]``, float32 (float64 for
    float64 logits); ``ref`` is reference logits ``[..., V]`` (no grad) or a top-k pair
    ``(ids [..., m], logprobs [..., m])`` (see
    :func:`~vocabmetric.regularizers.reference_probs`).

    Cost: O(V + n_trained·T + n_inner) time per position for the value (n_inner: the trees'
    nodes that are not a single token's leaf) and as much again for the gradient, both in
    the forward pass; memory O(chunk·(V + n_nodes)) scratch plus the
    saved ``∂W/∂z`` (one tensor the size of the logits) until backward.

    Gradient: ``∂W/∂z = p ⊙ (g − ⟨p, g⟩)``, ``g_i = Σ_{v ∋ i} w_v sign(D_v)``; 0 at p = q.

    Examples
    --------
    >>> reg = TreeWasserstein.from_store(store)                             # doctest: +SKIP
    >>> loss = (reg(policy_logits, ref_logits) * mask).sum() / mask.sum()   # doctest: +SKIP
    """

    name = "tree"
    backends = BACKENDS

    def __init__(self, tree: TreeMetric | TreeEnsemble | Sequence[TreeMetric], *, backend: str = "auto",
                 chunk_size: int | None = None):
        super().__init__()
        if isinstance(tree, (list, tuple)) and tree and all(isinstance(t, TreeMetric) for t in tree):
            tree = tree[0] if len(tree) == 1 else TreeEnsemble(tree)
        if not isinstance(tree, (TreeMetric, TreeEnsemble)):
            raise self.config_error(f"tree must be a TreeMetric, a TreeEnsemble or a list of TreeMetrics, "
                                    f"got {type(tree).__name__}")
        self._configure(backend=backend, chunk_size=chunk_size)
        self.tree = tree
        self.layout = TreeLayout(tree.trees)
        self._tables: dict = {}

    @classmethod
    def from_store(cls, store: Any, **kw) -> "TreeWasserstein":
        """Build from a :class:`~vocabmetric.store.MetricStore`'s tree metric, all its trees (fingerprint set)."""
        return cls(store.tree(), **kw)

    @property
    def vocab_size(self) -> int:
        return self.tree.vocab_size

    @property
    def fingerprint(self) -> str | None:
        """The tokenizer fingerprint of the tree (None if unknown)."""
        return self.tree.fingerprint

    def extra_repr(self) -> str:
        return f"{self.tree!r}, backend={self.backend!r}"

    def cpu_kernel(self):
        return _numba_kernel()

    def forward(self, logits: torch.Tensor, ref: Reference, *, fingerprint: str | None = None) -> torch.Tensor:
        """Per-position W1 ``[...]`` between ``softmax(logits)`` and the reference."""
        where = "TreeWasserstein"
        self.check_logits(logits, fingerprint)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        backend = self.backend_for(logits.device)
        key = (str(logits.device), dtype)
        if backend == "torch" and key not in self._tables:
            self._tables[key] = self.layout.torch_tables(logits.device, dtype)

        def chunk(p, q, value_out, dz_out) -> None:
            if backend == "numba":
                _chunk_numba(self.layout, p.contiguous(), q.contiguous(), value_out, dz_out)
            else:
                _chunk_torch(self.layout, self._tables[key], p, q, value_out, dz_out)

        return solve_by_chunks(logits, ref, chunk, chunk_size=self.chunk_size, dtype=dtype, where=where)
