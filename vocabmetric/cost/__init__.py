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

from ._checks import DENSE_LIMIT, check_fingerprint, check_vocab_size
from ._cost import CostOperator
from ._tree import TreeEnsemble, TreeMetric

__all__ = ["DENSE_LIMIT", "CostOperator", "TreeEnsemble", "TreeMetric", "check_fingerprint", "check_vocab_size"]
