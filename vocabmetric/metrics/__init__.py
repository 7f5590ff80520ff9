"""Ground metrics over a vocabulary, built from token embeddings: arrays in, arrays out.

Every builder reads like scikit-learn: configure, ``fit(embeddings, trained)``, read the
learned state (trailing underscore). ``embeddings`` is ``(V, d)`` float32 (row i = token
id i); ``trained`` is ``(V,)`` bool. An untrained token (never seen in the corpus) is
*isolated*: it has no stored neighbour and is nobody's neighbour, so every cost to it is
the cap.

Truncated metrics (:class:`L2Metric`, :class:`KnnMetric`, :class:`GeodesicMetric`,
:class:`UmapMetric`) end with

* ``indices_`` (V, k) int32, ``-1`` = empty slot; rows sorted by cost, cheapest first;
* ``costs_`` (V, k) float32, finite and >= 0 in filled slots, ``cap_`` in empty ones;
* ``cap_`` float >= every stored cost: by default the 99th percentile of the metric over
  random trained pairs, raised to the largest stored cost when that is higher
  (``params_["cap_statistic"]`` says so); pass ``cap=`` to fix it;
* ``params_`` dict of plain values, to be stored as attrs (kind, k, cap, cap_statistic, …).

``to_operator()`` wraps them in a :class:`~vocabmetric.cost.CostOperator`. The tree
builders (:class:`TreeBuilder`, :class:`WardTreeBuilder`) end with ``parent_``,
``weight_``, ``leaf_of_token_``, ``cap_``, ``params_``; ``to_tree()`` wraps them in a
:class:`~vocabmetric.cost.TreeMetric`.

``l2`` versus ``knn``: the l2 metric is the normalized Euclidean distance
``‖x_i/‖x_i‖ − x_j/‖x_j‖‖`` in [0, 2]. :func:`l2_distance` gives it exactly for any pair;
:class:`L2Metric` is its exact top-k table (faiss ``IndexFlatIP``). :class:`KnnMetric` is
the same table built with a choice of index: with ``index="flat"`` its arrays equal
``L2Metric``'s, with ``index="hnsw"`` it is approximate (some true neighbours missed) but
every stored cost is still the exact float64 l2 distance. Build the flat table once and
pass it as ``knn=(indices_, costs_)`` to the geodesic, umap and tree builders.

Every builder's ``validate(where=None)`` checks its constructor arguments without
embeddings (the pipeline calls it at config load; ``fit`` calls it first) and raises
:class:`~vocabmetric.errors.ConfigError` naming the argument and its value.

The modules, each importing only those above it:
``_shape`` (cost shaping) ← ``_checks`` (inputs, argument checks, cap policy, the truncated base) ← ``_knn``
(faiss kNN, the kNN graph) ← ``_geodesic`` (bounded Dijkstra), ``_umap``, ``_tree`` (k-means trees) ← ``_tree_graph``
(Ward trees on the kNN graph).

Example
-------
>>> knn = KnnMetric(k=64).fit(embeddings, trained)
>>> geo = GeodesicMetric(k_graph=10, k=128).fit(embeddings, trained, knn=(knn.indices_, knn.costs_))
>>> geo.to_operator().neighbors(42)
"""

from .._util.vectors import l2_distance as l2_distance, normalized as normalized
from ._checks import random_pairs as random_pairs
from ._geodesic import GeodesicMetric as GeodesicMetric, bounded_dijkstra as bounded_dijkstra
from ._knn import KnnMetric as KnnMetric, L2Metric as L2Metric, drop_self as drop_self, knn_graph as knn_graph
from ._shape import SHAPE_KEYS as SHAPE_KEYS, SHAPES as SHAPES, CostShape as CostShape, shape_table as shape_table
from ._tree import TreeBuilder as TreeBuilder, TreeRefit as TreeRefit
from ._tree_graph import WardTreeBuilder as WardTreeBuilder
from ._umap import UmapMetric as UmapMetric
