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
    builder = "kmeans"            # the default for word2vec; "ward" for imported embeddings
    branching = 16
    n_trees = 4                   # k-means trees averaged (TreeBuilder only)

Cost shaping (:class:`~vocabmetric.metrics.CostShape`), in any table but ``l2`` (exact on
demand, so never shaped)::

    [metrics.knn]
    shape = "fraction"            # "none" (default), "power", "fraction", "rank" (not the tree)
    shape_fraction = 0.2          # the median 10th neighbour costs 0.2·cap
    shape_rank = 10
    shape_exponent = 2.0          # shape = "power": cap·(c/cap)^2

The fitted shape (its exponent and which metric properties it keeps) is stored in the
metric's attrs under ``shape`` and shown by ``vocabmetric info``. Imported embeddings fill in
:data:`IMPORTED_DEFAULTS` where a table leaves keys out (:func:`with_embedding_defaults`).

Every other key is a keyword of the builder's constructor (see :mod:`vocabmetric.metrics`).
The flat kNN graph that the geodesic, umap and ward builders read is built once, as its own
cached stage, with the largest degree any of them needs; each metric is then a cached stage
keyed by its parameters and the content digests of what it reads (the embeddings, the
graph), so changing one metric rebuilds only that one, and other embeddings (a rerun of a
nondeterministic word2vec) rebuild every metric. Every builder argument is checked at
config load (:func:`validate_metrics`, the builders' ``validate()``), before any stage runs.

Whenever a metric is configured, the stage also lays the usable tokens out in 2-D (UMAP
with 2 components on the same shared graph; the ``[projection]`` table of the config, on
by default) for the explorer page and the plots: ``projection2d`` (V, 2) float32, NaN rows
for unusable tokens, its own cached stage. Cost: UMAP's, about 50 s for 26k tokens on 2 cores
at 200 epochs; vocabularies under :data:`SMALL_MAP` tokens get fewer epochs.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError
from ..metrics import SHAPE_KEYS, CostShape, GeodesicMetric, KnnMetric, L2Metric, TreeBuilder, UmapMetric, WardTreeBuilder
from .stages import Stages, stage_key
from ..store import TREE, TreeArrays, TruncatedMetric

LOG = logging.getLogger(__name__)

TRUNCATED = {"l2": L2Metric, "knn": KnnMetric, "geodesic": GeodesicMetric, "umap": UmapMetric}
TREE_BUILDERS = {"kmeans": TreeBuilder, "ward": WardTreeBuilder}
KINDS = (*TRUNCATED, TREE)
#: Constructor keywords the pipeline sets itself.
_RESERVED = {"progress"}
#: Below this many usable tokens the 2-D map trains for :data:`SMALL_MAP_EPOCHS` epochs (a
#: test-sized vocabulary), else for UMAP's 200; ``[projection] n_epochs`` overrides both.
SMALL_MAP = 5000
SMALL_MAP_EPOCHS = 100
PROJECTION = "projection2d"


#: What a ``[metrics.*]`` table gets, for each key it leaves out, when the embeddings are imported
#: from a model (``[embeddings] method = "import"``). A model's own embeddings live in hundreds of
#: dimensions where every distance is alike (SmolLM2-135M: a 10-NN pair costs 0.75 of a random
#: pair under l2), so the knn cost is sharpened and the tree is grown from the neighbours up:
#: measured in docs/results.md ("Contrast and price"), reasoned in docs/building.md ("Defaults
#: by embeddings"). word2vec stores keep the builders' own defaults.
IMPORTED_DEFAULTS: dict[str, dict[str, Any]] = {
    "knn": {"shape": "fraction", "shape_fraction": 0.2},
    TREE: {"builder": "ward", "top_size": 256, "shape": "fraction", "shape_fraction": 0.2},
}


def with_embedding_defaults(metrics: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The ``[metrics.*]`` tables with :data:`IMPORTED_DEFAULTS` filled in where ``method`` is
    ``"import"`` (keys a table sets win; a table that sets ``shape`` takes no shape default, one
    that names another tree ``builder`` no tree default). Any other method: unchanged.

    A tree table that leaves ``builder`` out but sets a key only the k-means builder takes
    (``branching``, ``follow_knn`` …) is a :class:`ConfigError` saying which builder to name.
    """
    if method != "import":
        return dict(metrics)
    out = {}
    for name, table in metrics.items():
        if not isinstance(table, dict):
            out[name] = table  # validate_metrics names it
            continue
        kind = table.get("kind", name)
        defaults = dict(IMPORTED_DEFAULTS.get(kind, {}))
        if kind == TREE and table.get("builder", "ward") != "ward":
            defaults = {}
        if "shape" in table:
            defaults = {k: v for k, v in defaults.items() if k not in SHAPE_KEYS}
        elif kind == "knn" and isinstance(table.get("k"), int) and table["k"] < CostShape().rank:
            defaults["shape_rank"] = max(1, table["k"])  # the fraction is read at the last stored neighbour
        if kind == TREE and "builder" not in table:
            ward = set(inspect.signature(WardTreeBuilder).parameters)
            kmeans_only = sorted(set(table) - ward - {"kind"})
            if kmeans_only:
                raise ConfigError(
                    f"metrics.tree.{kmeans_only[0]}: with imported embeddings the tree builder defaults to "
                    f'"ward", which takes no {kmeans_only[0]}; set builder = "kmeans" to grow k-means trees '
                    "(docs/building.md, \"Defaults by embeddings\"), or remove the key")
        out[name] = {**defaults, **table}
    return out


def _builder_class(kind: str, table: Mapping[str, Any]) -> type:
    if kind == TREE:
        return TREE_BUILDERS[table.get("builder", "kmeans")]
    return TRUNCATED[kind]


def _resolved(builder: Any) -> dict[str, Any]:
    """Every constructor keyword of a tree builder with the value it runs with (defaults
    included, :data:`_RESERVED` left out): part of the tree stage's key, so that a changed
    default (``n_trees`` 8 → 4, ``follow_knn`` added) rebuilds a cached tree instead of
    serving the one built under the old default."""
    names = inspect.signature(type(builder).__init__).parameters
    skip = {"self", *_RESERVED} | (set(SHAPE_KEYS) if getattr(builder, "shape", "none") == "none" else set())
    # an unshaped tree keeps the key it had before shaping existed, one Ward tree the key it had
    # before Ward forests: their cached builds are still right
    if isinstance(builder, WardTreeBuilder) and builder.n_trees == 1:
        skip |= {"n_trees", "subspace"}
    return {n: getattr(builder, n) for n in names if n not in skip and hasattr(builder, n)}


def _split(name: str, table: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(kind, constructor keywords)`` of one ``[metrics.<name>]`` table."""
    params = dict(table)
    kind = params.pop("kind", name)
    params.pop("builder", None)
    return kind, params


def validate_metrics(metrics: Mapping[str, Any]) -> None:
    """Check every ``[metrics.*]`` table before any work: kind, keys, value types, and each
    value against its builder's own rules (``validate()``, no embeddings needed)."""
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
        _builder_class(kind, table)(**params).validate(where=f"[{where}]")


#: Builder keywords that count neighbours: each must be below the tokens a metric can place.
NEIGHBOUR_COUNTS = ("k", "k_graph", "n_neighbors", "follow_knn")


def check_neighbour_counts(metrics: Mapping[str, Any], projection: Mapping[str, Any], n_tokens: int,
                           tokenizer: str) -> None:
    """Every neighbour count of every ``[metrics.*]`` table (and of ``[projection]``, when a
    metric is configured) below ``n_tokens``, the tokenizer's ids that have a text (the
    most tokens that can ever get a vector): checked once the tokenizer is loaded, before the
    corpus is read. A :class:`ConfigError` naming the key, its value and the count."""
    counts = []
    for name, table in metrics.items():
        kind, params = _split(name, table)
        builder = _builder_class(kind, table)(**params)
        counts += [(f"metrics.{name}.{key}", getattr(builder, key)) for key in NEIGHBOUR_COUNTS
                   if isinstance(getattr(builder, key, None), int)]
    if metrics and projection.get("enabled", True):
        counts.append(("projection.n_neighbors", projection.get("n_neighbors", 15)))
    for where, value in counts:
        if value >= n_tokens:
            raise ConfigError(f"{where}: {value} must be smaller than the {n_tokens:,} tokens with a text in "
                              f"{tokenizer} (at most {n_tokens - 1:,} others can be a token's neighbours; fewer "
                              f"once the corpus decides which get a vector); lower it")


def _graph_degree(builder: Any) -> int:
    """How many flat kNN neighbours a builder reads (0: it builds none)."""
    if isinstance(builder, GeodesicMetric):
        return builder.k_graph
    if isinstance(builder, UmapMetric):
        return builder.n_neighbors - 1
    if isinstance(builder, WardTreeBuilder):  # its weight fit reads each token's 10 nearest
        return max(builder.n_neighbors, 10 if builder.fit_weights else 0)
    return 0


def build_metrics(metrics: Mapping[str, Any], emb: Any, stages: Stages, emb_digest: str, *, progress: bool | None = None,
                  projection: Mapping[str, Any] | None = None):
    """Fit every configured metric (cached per metric). Returns ``(truncated, tree, extra)``.

    ``truncated`` maps names to :class:`~vocabmetric.store.TruncatedMetric`, ``tree`` is a
    :class:`~vocabmetric.store.TreeArrays` or None, ``extra`` holds further arrays for the
    store: ``projection2d`` (V, 2) float32 unless ``projection["enabled"]`` is false or no
    metric is configured. ``projection``: the ``[projection]`` table (``enabled``,
    ``n_neighbors``, ``n_epochs``, ``seed``); None means its defaults. ``emb_digest``: the
    content digest of the embed stage's arrays (:meth:`Stages.digest`), part of every key.
    """
    builders = {}
    for name, table in metrics.items():
        kind, params = _split(name, table)
        builders[name] = (kind, _builder_class(kind, table)(**params, progress=progress), dict(table))
    usable = emb.usable
    projection = {"enabled": True, "n_neighbors": 15, "n_epochs": None, "seed": 0, **(projection or {})}
    project = bool(builders) and projection["enabled"] and usable.sum() >= 2
    degree = max((_graph_degree(b) for _, b, _ in builders.values()), default=0)
    if project:
        degree = max(degree, min(projection["n_neighbors"], int(usable.sum())) - 1)
    graph = None
    graph_digest = ""
    if degree:
        graph_key = stage_key("knn-graph", {"k": degree}, emb_digest)

        def fit_graph(tmp: Path) -> None:
            base = KnnMetric(degree, progress=progress).fit(emb.vectors, usable)
            np.save(tmp / "indices.npy", base.indices_)
            np.save(tmp / "costs.npy", base.costs_)

        gdir = stages.run("knn-graph", graph_key, fit_graph)
        graph_digest = stages.digest("knn-graph")
        graph = (np.load(gdir / "indices.npy"), np.load(gdir / "costs.npy"))

    def nearest(need: int) -> tuple[np.ndarray, np.ndarray]:
        """The shared graph cut to each token's ``need`` nearest (rows are sorted by cost)."""
        return graph[0][:, :need], graph[1][:, :need]

    truncated: dict[str, TruncatedMetric] = {}
    tree = None
    for name, (kind, builder, table) in builders.items():
        need = _graph_degree(builder)
        params = {**table, **_resolved(builder)} if kind == TREE else table
        key = stage_key(f"metric-{name}", params, emb_digest, graph_digest if need else "")

        def fit(tmp: Path, builder=builder, need=need) -> None:
            knn = {"knn": nearest(need)} if need else {}
            builder.fit(emb.vectors, usable, **knn)
            fields = ("parent_", "weight_", "leaf_of_token_", "offsets_") if kind == TREE else ("indices_", "costs_")
            for f in fields:
                np.save(tmp / f"{f.rstrip('_')}.npy", getattr(builder, f))
            (tmp / "meta.json").write_text(json.dumps({"cap": builder.cap_, "params": builder.params_}, default=float))

        mdir = stages.run(f"metric-{name}", key, fit)
        meta = json.loads((mdir / "meta.json").read_text())
        attrs = {**meta["params"], "name": name}
        if kind == TREE:
            tree = TreeArrays(*(np.load(mdir / f"{f}.npy") for f in ("parent", "weight", "leaf_of_token")), attrs,
                              offsets=np.load(mdir / "offsets.npy"))
        else:
            truncated[name] = TruncatedMetric(np.load(mdir / "indices.npy"), np.load(mdir / "costs.npy"), meta["cap"], attrs)
    extra = {PROJECTION: _projection(projection, emb, stages, emb_digest, graph_digest, nearest, progress)} if project else {}
    return truncated, tree, extra


def _projection(projection: Mapping[str, Any], emb: Any, stages: Stages, emb_digest: str, graph_digest: str,
                nearest: Any, progress: bool | None) -> np.ndarray:
    """The (V, 2) float32 UMAP layout of the usable tokens on the shared graph (cached stage)."""
    usable = emb.usable
    n_neighbors = min(projection["n_neighbors"], int(usable.sum()))
    n_epochs = projection["n_epochs"] or (SMALL_MAP_EPOCHS if usable.sum() < SMALL_MAP else 200)
    params = {"n_neighbors": n_neighbors, "n_epochs": n_epochs, "seed": projection["seed"]}
    key = stage_key(PROJECTION, params, emb_digest, graph_digest)

    def fit(tmp: Path) -> None:
        umap = UmapMetric(n_components=2, k=1, n_neighbors=n_neighbors, seed=params["seed"], n_epochs=n_epochs,
                          progress=progress)
        umap.fit(emb.vectors, usable, knn=nearest(n_neighbors - 1))
        np.save(tmp / f"{PROJECTION}.npy", umap.embedding_.astype(np.float32))

    return np.load(stages.run(PROJECTION, key, fit) / f"{PROJECTION}.npy")
