"""The pipeline's ``metrics`` stage: the ``[metrics.*]`` tables of a config → fitted metrics.

Each table names a metric; its ``kind`` defaults to the table name::

    [metrics.knn]                 # KnnMetric
    k = 64
    [metrics.geodesic]            # GeodesicMetric
    k_graph = 10
    k = 128
    [metrics.umap]                # UmapMetric
    n_components = 8
    [metrics.tree]                # TreeBuilder (builder = "kmeans") or WardTreeBuilder ("ward")
    branching = 16

Every other key is a keyword of the builder's constructor (see :mod:`vocabmetric.metrics`).
The flat kNN graph that the geodesic, umap and ward builders read is built once, as its own
cached stage, with the largest degree any of them needs; each metric is then a cached stage
keyed by its parameters and the embeddings, so changing one metric rebuilds only that one.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError
from .metrics import GeodesicMetric, KnnMetric, L2Metric, TreeBuilder, UmapMetric, WardTreeBuilder
from .store import TREE, TreeArrays, TruncatedMetric

LOG = logging.getLogger(__name__)

TRUNCATED = {"l2": L2Metric, "knn": KnnMetric, "geodesic": GeodesicMetric, "umap": UmapMetric}
TREE_BUILDERS = {"kmeans": TreeBuilder, "ward": WardTreeBuilder}
KINDS = (*TRUNCATED, TREE)
#: Constructor keywords the pipeline sets itself.
_RESERVED = {"progress"}


def _builder_class(kind: str, table: Mapping[str, Any]) -> type:
    if kind == TREE:
        return TREE_BUILDERS[table.get("builder", "kmeans")]
    return TRUNCATED[kind]


def _split(name: str, table: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(kind, constructor keywords)`` of one ``[metrics.<name>]`` table."""
    params = dict(table)
    kind = params.pop("kind", name)
    params.pop("builder", None)
    return kind, params


def validate_metrics(metrics: Mapping[str, Any]) -> None:
    """Check every ``[metrics.*]`` table before any work: kind, keys, value types."""
    for name, table in metrics.items():
        where = f"metrics.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {table!r}")
        kind, params = _split(name, table)
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown metric kind {kind!r}; use one of: {', '.join(KINDS)} (or set kind = ...)")
        if (kind == TREE) != (name == TREE):
            raise ConfigError(f"{where}: the tree metric must be the table [metrics.tree] (one per store)")
        builder = table.get("builder", "kmeans")
        if kind == TREE and builder not in TREE_BUILDERS:
            raise ConfigError(f"{where}.builder: {builder!r} is not one of {', '.join(TREE_BUILDERS)}")
        if kind != TREE and "builder" in table:
            raise ConfigError(f"{where}.builder: only [metrics.tree] has a builder")
        signature = inspect.signature(_builder_class(kind, table))
        allowed = {p for p in signature.parameters if p != "self"} - _RESERVED
        for key, value in params.items():
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: unknown key for a {kind} metric; it takes: {', '.join(sorted(allowed))}")
            default = signature.parameters[key].default
            if default is not None and default is not inspect.Parameter.empty and value is not None:
                same = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
                if isinstance(default, bool) != isinstance(value, bool) or not same:
                    raise ConfigError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")


def _graph_degree(kind: str, builder: Any) -> int:
    """How many flat kNN neighbours a builder reads (0: it builds none)."""
    if isinstance(builder, GeodesicMetric):
        return builder.k_graph
    if isinstance(builder, UmapMetric):
        return builder.n_neighbors - 1
    if isinstance(builder, WardTreeBuilder):
        return builder.n_neighbors
    return 0


def build_metrics(metrics: Mapping[str, Any], emb: Any, stages: Any, emb_key: str, *, progress: bool | None = None):
    """Fit every configured metric (cached per metric). Returns ``(truncated, tree, extra)``.

    ``truncated`` maps names to :class:`~vocabmetric.store.TruncatedMetric`, ``tree`` is a
    :class:`~vocabmetric.store.TreeArrays` or None, ``extra`` holds further arrays for the
    store (none yet).
    """
    from .pipeline import stage_key

    builders = {}
    for name, table in metrics.items():
        kind, params = _split(name, table)
        builders[name] = (kind, _builder_class(kind, table)(**params, progress=progress), dict(table))
    usable = emb.usable
    degree = max((_graph_degree(k, b) for k, b, _ in builders.values()), default=0)
    graph = None
    graph_key = ""
    if degree:
        graph_key = stage_key("knn-graph", {"k": degree}, emb_key)

        def fit_graph(tmp: Path) -> None:
            base = KnnMetric(degree, progress=progress).fit(emb.vectors, usable)
            np.save(tmp / "indices.npy", base.indices_)
            np.save(tmp / "costs.npy", base.costs_)

        gdir = stages.run("knn-graph", graph_key, fit_graph)
        graph = (np.load(gdir / "indices.npy"), np.load(gdir / "costs.npy"))

    truncated: dict[str, TruncatedMetric] = {}
    tree = None
    for name, (kind, builder, table) in builders.items():
        need = _graph_degree(kind, builder)
        key = stage_key(f"metric-{name}", table, emb_key, graph_key if need else "")

        def fit(tmp: Path, builder=builder, need=need) -> None:
            knn = {"knn": (graph[0][:, :need], graph[1][:, :need])} if need else {}
            builder.fit(emb.vectors, usable, **knn)
            fields = ("parent_", "weight_", "leaf_of_token_") if kind == TREE else ("indices_", "costs_")
            for f in fields:
                np.save(tmp / f"{f.rstrip('_')}.npy", getattr(builder, f))
            (tmp / "meta.json").write_text(json.dumps({"cap": builder.cap_, "params": builder.params_}, default=float))

        mdir = stages.run(f"metric-{name}", key, fit)
        meta = json.loads((mdir / "meta.json").read_text())
        attrs = {**meta["params"], "name": name}
        if kind == TREE:
            tree = TreeArrays(*(np.load(mdir / f"{f}.npy") for f in ("parent", "weight", "leaf_of_token")), attrs)
        else:
            truncated[name] = TruncatedMetric(np.load(mdir / "indices.npy"), np.load(mdir / "costs.npy"), meta["cap"], attrs)
    return truncated, tree, {}
