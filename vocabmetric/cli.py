"""The ``vocabmetric`` command: build, info, verify, neighbors, cost, export, eval, serve, plot."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import VocabMetricError

LOG = logging.getLogger(__name__)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A ground metric over a tokenizer's whole vocabulary: build it, query it, serve it.",
)


def _fail(exc: Exception, code: int = 2) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _open(store: Path):
    from .store import open_store

    try:
        return open_store(store)
    except VocabMetricError as exc:
        _fail(exc)


@app.command()
def build(
    config: Path = typer.Argument(..., help="pipeline config (TOML), e.g. pipelines/demo.toml"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="build directory (default runs/<config name>)"),
    force: bool = typer.Option(False, "--force", help="rebuild every stage, ignoring the cache"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or report"),
) -> None:
    """Build a metric store: tokenize → word2vec → metrics → OUT/metric.zarr."""
    from .building.pipeline import build as run_build
    from .query.report import build_report

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for chatty in ("gensim", "numba", "umap", "faiss"):  # their per-batch INFO lines drown the report
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        result = run_build(config, out, force=force, progress=None if not quiet else False)
    except VocabMetricError as exc:
        _fail(exc)
    if not quiet:
        report = result.config.report
        typer.echo(build_report(result, probes=report.probes, k=report.k))
    else:
        typer.echo(str(result.store_path))


@app.command()
def info(store: Path = typer.Argument(..., help="a metric.zarr store"), as_json: bool = typer.Option(False, "--json")) -> None:
    """What a store holds: tokenizer, corpus, embeddings (tokens per provenance), metrics."""
    from .query.report import info_table

    s = _open(store)
    typer.echo(json.dumps(s.info(), indent=2) if as_json else info_table(s))


@app.command()
def verify(store: Path = typer.Argument(..., help="a metric.zarr store")) -> None:
    """Check every file of a store against its manifest (sizes and content hashes).

    Exit 0 when all match; 1 when a file is missing, damaged or the store has no manifest."""
    from .store.integrity import Manifest

    if not (store / "zarr.json").is_file():
        _fail(VocabMetricError(f"{store} is not a vocabmetric store; build one with `vocabmetric build CONFIG`"))
    try:
        manifest = Manifest.load(store)
        if manifest is None:
            _fail(VocabMetricError(f"{store} has no manifest.json (written before vocabmetric verified its stores): "
                                   "it is unverified; rebuild it with `vocabmetric build CONFIG --out DIR`"), code=1)
        checked = manifest.verify()
    except VocabMetricError as exc:
        _fail(exc, code=1)
    typer.echo(f"{store}: {checked} files checked against manifest.json, all match")


@app.command()
def neighbors(
    store: Path = typer.Argument(..., help="a metric.zarr store"),
    token: str = typer.Argument(..., help="token text (quote a leading space: ' beautiful') or id"),
    k: int = typer.Option(10, "-k", help="how many neighbours (a stored metric has at most its stored k)"),
    metric: str = typer.Option("knn", "--metric", "-m", help="metric name (see `vocabmetric info`)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The k nearest tokens of TOKEN, with their costs and provenance (trained, borrowed, composed)."""
    from .query.report import neighbor_table

    s = _open(store)
    try:
        rows = s.neighbors(token, k=k, metric=metric)  # digits: an id unless a token has that text
        query = s.resolve(token)
    except VocabMetricError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps([{**r._asdict(), "provenance": s.provenance_of(r.id)} for r in rows], ensure_ascii=False))
    else:
        typer.echo(neighbor_table(s, query, rows, metric))
    if 0 < len(rows) < k:  # on stderr: stdout stays the table (or JSON) a script reads
        typer.echo(_fewer_rows_note(s, metric, len(rows), k), err=True)


def _fewer_rows_note(s, metric: str, n: int, k: int) -> str:
    from .store import EXACT_METRICS, TREE

    if metric in EXACT_METRICS or metric == TREE:
        return f"note: {n} of the {k} asked: only {n} other tokens have a vector"
    stored = s.operator(metric).k
    return (f"note: {n} of the {k} asked: {metric} stores {stored} neighbours per token (the rest cost its cap "
            f"{s.metric_attrs(metric)['cap']:.4g}); l2 and tree rank every token")


@app.command()
def cost(
    store: Path = typer.Argument(...),
    a: str = typer.Argument(..., help="token text or id"),
    b: str = typer.Argument(..., help="token text or id"),
    metric: str = typer.Option("l2", "--metric", "-m"),
) -> None:
    """The cost between tokens A and B."""
    s = _open(store)
    try:
        value, stored = s.cost(a, b, metric=metric), s.is_stored(a, b, metric)
    except VocabMetricError as exc:
        _fail(exc)
    typer.echo(f"{value:.6g}")
    if not stored:  # on stderr: stdout stays the number a script reads
        why = ("one of the tokens has no vector" if metric in ("l2",) else
               f"{b!r} is not among the {s.operator(metric).k} stored {metric} neighbours of {a!r}")
        typer.echo(f"note: the cap of {metric}: {why}", err=True)


@app.command()
def export(
    store: Path = typer.Argument(...),
    metric: str = typer.Option(..., "--metric", "-m", help="a stored metric, or 'tree'"),
    out: Path = typer.Option(..., "--out", "-o", help="output .npz file"),
) -> None:
    """Export one metric's arrays to a .npz (indices, costs, cap, fingerprint; or the tree arrays,
    with ``offsets`` when the store holds several trees: ``TreeEnsemble.from_arrays`` reads them)."""
    import numpy as np

    s = _open(store)
    try:
        if metric == "tree":
            t = s.tree()
            arrays = dict(parent=t.parent, weight=t.weight, leaf_of_token=t.leaf_of_token)
            if hasattr(t, "offsets"):  # T > 1 trees, stacked: tree t is nodes offsets[t]:offsets[t+1]
                arrays["offsets"] = t.offsets
        else:
            op = s.operator(metric)
            arrays = dict(indices=op.indices, costs=op.costs, cap=np.float64(op.cap))
    except VocabMetricError as exc:
        _fail(exc)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, fingerprint=np.str_(s.fingerprint), **arrays)
    tmp.replace(out)
    typer.echo(f"wrote {out}")


@app.command(name="eval")
def eval_(
    store: Path = typer.Argument(..., help="a metric.zarr store"),
    as_json: bool = typer.Option(False, "--json"),
    price: bool = typer.Option(True, "--price/--no-price", help="the near/far price of each penalty (a few seconds each)"),
    contexts: int = typer.Option(200, "--contexts", help="contexts of the near/far price (synthetic, and model positions)"),
    price_model: Optional[Path] = typer.Option(None, "--price-model", help="also price on this causal LM's own next-token "
                                               "distributions: a Hugging Face model directory or a .gguf file "
                                               "(pkg:<package>/<file> too) with the store's tokenizer"),
    price_text: Optional[Path] = typer.Option(None, "--price-text", help="--price-model: the text it reads, any corpus "
                                              "file `build` reads, one passage a line [default: gensim's Lee corpus]"),
) -> None:
    """Each metric against human similarity (WordSim353, SimLex-999) and beside l2 (10-NN contrast,
    Spearman over random trained pairs), and each penalty's near/far price (synthetic contexts; with
    --price-model, also the model's own next-token distributions, side by side)."""
    from .query.evaluation import evaluate, format_contrast, format_eval, metric_contrast
    from .query.price import format_prices, near_far_prices, store_penalties

    s = _open(store)
    prices = []
    try:
        if price and price_model is not None:  # its errors before the minutes of the rest
            from .query.model_contexts import load_causal_lm, model_contexts

            model = load_causal_lm(price_model, s)
            texts = _passages(price_text) if price_text is not None else None
        rows = evaluate(s)
        contrast = metric_contrast(s)
        if price:
            penalties = store_penalties(s)
            prices = near_far_prices(s, penalties, n_contexts=contexts)
            if price_model is not None:
                prices += near_far_prices(s, penalties, contexts=model_contexts(s, model, contexts, texts=texts))
    except VocabMetricError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({"human": [r._asdict() for r in rows], "contrast": [r._asdict() for r in contrast],
                               "price": [r._asdict() for r in prices]}, indent=2))
        return
    typer.echo(format_eval(rows) + "\n\n" + format_contrast(contrast) + ("\n\n" + format_prices(prices) if prices else ""))


def _passages(path: Path) -> list[str]:
    """The non-empty lines of a corpus file's documents (any format ``build`` reads)."""
    from .building.corpus import expand_sources, iter_documents
    from .building.corpus.wikipedia import plain_text

    texts = (plain_text(d.text) if d.wiki else d.text for source in expand_sources([str(path)]) for d in iter_documents(source))
    return [line.strip() for text in texts for line in text.splitlines() if line.strip()]


@app.command()
def serve(
    store: Path = typer.Argument(..., help="a metric.zarr store"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default)"),
    port: int = typer.Option(8000, "--port", "-p"),
    workers: int = typer.Option(1, "--workers", help="uvicorn worker processes"),
    header_timeout: Optional[float] = typer.Option(None, "--header-timeout", help="seconds for a request's headers to "
                                                   "arrive [default: vocabmetric.query.service.HEADER_TIMEOUT, 5]"),
    body_timeout: Optional[float] = typer.Option(None, "--body-timeout", help="seconds for a request's body to arrive "
                                                 "[default: vocabmetric.query.service.BODY_TIMEOUT, 30]"),
    limit_concurrency: Optional[int] = typer.Option(None, "--limit-concurrency", help="connections and requests at once "
                                                    "per worker, beyond: 503 [default: vocabmetric.query.service.LIMIT_CONCURRENCY]"),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="one log line per request"),
) -> None:
    """Serve neighbour costs over HTTP (GET /neighbors, /cost, /info; OpenAPI at /docs)."""
    from .query.service import serve as run_server

    _open(store)  # a clear error before the server starts
    given = dict(header_timeout=header_timeout, body_timeout=body_timeout, limit_concurrency=limit_concurrency)
    try:
        run_server(store, host=host, port=port, workers=workers, access_log=access_log,
                   **{name: value for name, value in given.items() if value is not None})
    except VocabMetricError as exc:  # e.g. an array that fails its hash when the app loads it
        _fail(exc)


@app.command()
def plot(
    source: Path = typer.Argument(..., help="a metric.zarr store"),
    out: Path = typer.Option(..., "--out", "-o", help="output .png file"),
    kind: str = typer.Option("map", "--kind", help="map: the 2-D map with labelled neighbourhoods; costs: neighbour "
                             "costs per metric with the cap"),
    probe: list[str] = typer.Option([], "--probe", help="map: a token text or id to label with its neighbours (repeatable)"),
    k: int = typer.Option(8, "-k", help="map: neighbours per probe"),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="map: the neighbours' metric (default knn); costs: only this metric"),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT in pixels (default depends on the kind)"),
) -> None:
    """Draw a PNG of a store: the 2-D map or the neighbour-cost distributions."""
    from .query.plots import parse_size
    from .query.plots import plot as draw

    try:
        path = draw(kind, source, out, probes=probe, k=k, metric=metric, size=parse_size(size) if size else None)
    except VocabMetricError as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
