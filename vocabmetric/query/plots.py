"""Pictures of a store: what ``vocabmetric plot`` draws (matplotlib, imported only here, lazily).

* :func:`plot_map` — the store's 2-D map (``projection2d``) with a few labelled
  neighbourhoods: each probe token and its ``k`` cheapest neighbours under one metric.
* :func:`plot_costs` — per metric, the histogram of its neighbour costs with the cap marked.

:func:`new_figure` and :func:`save_png` are the two steps every picture shares; the
benchmark charts (``benchmarks/plot_results.py``) use them too.

Each writes a PNG of exactly ``size = (width, height)`` pixels (no tight bounding box) and
returns its path. No pyplot: figures are made with :class:`matplotlib.figure.Figure` and the
Agg canvas, so plotting never opens a window nor touches global state. Token text is drawn
with ``parse_math=False`` (a token ``"$x$"`` is text, not TeX); whitespace is made visible
(a space is ``␣``) as on the explorer page.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .._util.progress import progress_bar
from ..errors import ConfigError, StoreError
from ..store import EXACT_METRICS, TREE, MetricStore
from ..vocab.tokenizer import visible

LOG = logging.getLogger(__name__)

DPI = 100
#: Tokens queried to sample the neighbour costs of a metric computed on demand (l2, tree).
SAMPLED_QUERIES = 200
SAMPLED_K = 16


def new_figure(size: tuple[int, int], rows: int = 1, cols: int = 1):
    """``(figure, axes)``: a ``size = (width, height)`` pixel figure with a ``(rows, cols)``
    array of axes; a :class:`ConfigError` under 100×100 pixels."""
    from matplotlib.figure import Figure

    width, height = size
    if width < 100 or height < 100:
        raise ConfigError(f"a plot must be at least 100x100 pixels, got {width}x{height}")
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_png(fig, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` as a PNG, atomically (a temporary name, then a rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # CJK / byte fragments in DejaVu
        fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(out)
    return out


# -- the map -----------------------------------------------------------------------------------
def default_probes(store: MetricStore, n: int = 4) -> list[int]:
    """``n`` frequent word tokens spread over the map (greedy farthest points among the 200
    most frequent usable tokens whose text is letters, 4 or more, after an optional space)."""
    xy = store.projection2d()
    on_map = np.isfinite(xy).all(axis=1)
    words = [i for i in np.argsort(-store.counts, kind="stable")[:5000]
             if on_map[i] and store.token_text(i).lstrip(" ").isalpha() and len(store.token_text(i).strip()) >= 4][:200]
    if not words:
        return [int(i) for i in np.flatnonzero(on_map)[:n]]
    chosen = [words[0]]
    while len(chosen) < min(n, len(words)):
        gap = np.min(np.linalg.norm(xy[words][:, None, :] - xy[chosen][None, :, :], axis=2), axis=1)
        chosen.append(words[int(np.argmax(gap))])
    return [int(i) for i in chosen]


def _default_metric(store: MetricStore) -> str:
    return next((m for m in ("knn", "geodesic", "umap") if m in store.metrics), store.metrics[0])


def plot_map(store: MetricStore, out: str | Path, *, probes: Sequence[int | str] | None = None, k: int = 8,
             metric: str | None = None, size: tuple[int, int] = (1200, 900)) -> Path:
    """The 2-D map of the usable tokens, with each probe and its ``k`` neighbours under
    ``metric`` (default: knn) highlighted and labelled. ``probes``: texts or ids (default:
    :func:`default_probes`). O(V) to draw plus one neighbour query per probe."""
    xy = store.projection2d()
    metric = metric or _default_metric(store)
    if metric not in store.metrics:
        raise StoreError(f"{store.path} has no metric {metric!r}; it has: {', '.join(store.metrics)}")
    ids = [store.resolve(p) for p in probes] if probes else default_probes(store)
    on_map = np.isfinite(xy).all(axis=1)
    fig, axes = new_figure(size)
    ax = axes[0, 0]
    ax.scatter(xy[on_map, 0], xy[on_map, 1], s=max(0.3, min(6.0, 3e4 / max(on_map.sum(), 1))), c="#7a8396",
               alpha=0.5, linewidths=0, rasterized=True)
    colors = [f"C{c}" for c in range(10)]
    for n, i in enumerate(ids):
        color = colors[n % len(colors)]
        if not on_map[i]:
            raise StoreError(f"probe {store.token_text(i)!r} (id {i}) is not on the map: it has no vector (provenance 'none': not trained, borrowed or composed); pick another")
        nbrs = [r for r in store.neighbors(i, k=k, metric=metric) if on_map[r.id]]
        pts = xy[[r.id for r in nbrs]] if nbrs else np.zeros((0, 2))
        for p in pts:
            ax.plot([xy[i, 0], p[0]], [xy[i, 1], p[1]], color=color, lw=0.6, alpha=0.5)
        ax.scatter(pts[:, 0], pts[:, 1], s=22, color=color, edgecolors="white", linewidths=0.5, zorder=3)
        ax.scatter([xy[i, 0]], [xy[i, 1]], s=90, color=color, edgecolors="black", linewidths=1, zorder=4,
                   label=f"{visible(store.token_text(i))} (id {i})")
        ax.annotate(visible(store.token_text(i)), xy[i], xytext=(6, 6), textcoords="offset points", fontsize=11,
                    fontweight="bold", color=color, parse_math=False, zorder=5)
        for r, p in zip(nbrs, pts):
            ax.annotate(visible(r.text), p, xytext=(4, -4), textcoords="offset points", fontsize=8, color=color,
                        parse_math=False, zorder=5)
    ax.set_title(f"{store.path.parent.name}/{store.path.name}: {int(on_map.sum()):,} of {store.vocab_size:,} tokens "
                 f"on the 2-D map; probes with their {k} nearest under {metric}", fontsize=11)
    ax.legend(loc="best", fontsize=9, markerscale=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    return save_png(fig, out)


# -- neighbour costs ------------------------------------------------------------------------------
def neighbor_costs(store: MetricStore, metric: str, *, sample: int = SAMPLED_QUERIES, k: int = SAMPLED_K,
                   seed: int = 0, progress: bool | None = None) -> tuple[np.ndarray, str]:
    """``(costs, what)``: every stored neighbour cost of a stored metric (filled slots), or,
    for ``l2``/``tree`` (computed on demand: O(V·d) float32 per query for l2, O(n_nodes)
    for tree, :meth:`~vocabmetric.store.MetricStore.neighbors`), the ``k`` cheapest of
    ``sample`` random usable tokens, with a progress bar (``progress``: None = on a terminal)."""
    if metric in EXACT_METRICS or metric == TREE:
        usable = np.flatnonzero(store.usable)
        rng = np.random.default_rng(seed)
        queries = rng.choice(usable, size=min(sample, len(usable)), replace=False) if len(usable) else []
        bar = progress_bar(queries, progress, desc=f"{metric}: neighbours of {len(queries)} sampled tokens", unit="token")
        costs = np.array([r.cost for i in bar for r in store.neighbors(int(i), k=k, metric=metric)], dtype=np.float64)
        return costs, f"{k} nearest of {len(queries)} sampled tokens"
    op = store.operator(metric)
    return op.costs[op.indices >= 0].astype(np.float64), f"{op.indices.shape[1]} stored neighbours per token"


def plot_costs(store: MetricStore, out: str | Path, *, metrics: Sequence[str] | None = None,
               size: tuple[int, int] | None = None, bins: int = 60) -> Path:
    """One histogram per metric of its neighbour costs, the cap as a red line. A stored
    metric: all its V·k costs, O(V·k); ``l2``/``tree``: :func:`neighbor_costs`' sample."""
    metrics = list(metrics or store.metrics)
    for m in metrics:
        if m not in store.metrics:
            raise StoreError(f"{store.path} has no metric {m!r}; it has: {', '.join(store.metrics)}")
    size = size or (1000, 60 + 220 * len(metrics))
    fig, axes = new_figure(size, rows=len(metrics))
    for ax, metric in zip(axes[:, 0], metrics):
        costs, what = neighbor_costs(store, metric)
        cap = float(store.metric_attrs(metric).get("cap", np.nan))
        finite = costs[np.isfinite(costs)]
        if len(finite):
            ax.hist(finite, bins=bins, color="#4c72b0", alpha=0.85)
        if np.isfinite(cap):
            ax.axvline(cap, color="#d62728", lw=2, ls="--", label=f"cap {cap:.3g}")
            ax.legend(loc="upper left", fontsize=9)
        share = f", {np.mean(finite >= cap):.1%} at the cap" if len(finite) and np.isfinite(cap) else ""
        ax.set_title(f"{metric}: {len(finite):,} costs ({what}{share})", fontsize=10, loc="left")
        ax.set_ylabel("count")
    axes[-1, 0].set_xlabel("neighbour cost")
    fig.suptitle(f"neighbour costs per metric — {store.path.parent.name}/{store.path.name}", fontsize=11)
    return save_png(fig, out)


def parse_size(text: str) -> tuple[int, int]:
    """``"1200x800"`` → ``(1200, 800)``; a clear error otherwise."""
    try:
        width, height = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected WIDTHxHEIGHT in pixels (e.g. 1200x800), got {text!r}") from None
    return width, height


KINDS = ("map", "costs")


def plot(kind: str, source: str | Path, out: str | Path, *, probes: Iterable[str] = (), k: int = 8,
         metric: str | None = None, size: tuple[int, int] | None = None) -> Path:
    """``vocabmetric plot``: draw the ``kind`` picture (one of :data:`KINDS`) of the store ``source``."""
    from ..store import open_store

    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    store = open_store(source)
    if kind == "map":
        return plot_map(store, out, probes=list(probes) or None, k=k, metric=metric, **({"size": size} if size else {}))
    return plot_costs(store, out, metrics=[metric] if metric else None, size=size)
