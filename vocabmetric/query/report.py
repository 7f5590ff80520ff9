"""Plain-text tables for the terminal: the build report, store info, neighbour tables.

Every table says how its tokens got their vectors (:data:`~vocabmetric.vocab.provenance.PROVENANCE`):
``info`` and the build report count each provenance, neighbour tables show it per row.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..vocab.provenance import PROVENANCE_MARK
from ..vocab.tokenizer import visible


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> str:
    """A fixed-width table; ``align`` has one ``<`` or ``>`` per column."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(row, align, widths)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


#: What the report and ``vocabmetric info`` say of a store built without a [corpus].
NO_CORPUS_LINE = "none: no [corpus] (embeddings imported), so token counts are absent (all zero)"


def _imported_from(params: dict) -> str:
    """``, from <tensor> of <path>`` for imported embeddings (tied head and dropped rows said)."""
    if "tensor" not in params or "path" not in params:
        return ""
    text = f"\n             from {params['tensor']} of {params['path']}"
    if params.get("tied"):
        text += " (matrix = 'output': the head is tied to the input embeddings)"
    if params.get("dropped_rows"):
        text += f"; {params['dropped_rows']:,} rows past the tokenizer dropped"
    return text


#: One letter per provenance, for tables with several columns of tokens.


def provenance_line(counts: dict) -> str:
    """``26,013 trained, 120 borrowed, 70,000 composed, 4,144 none (no vector)`` from
    ``{name: tokens}`` (:func:`~vocabmetric.store.provenance_counts`); a zero count is left
    out unless it is ``trained``."""
    order = [name for name in counts if name != "none"] + ["none"]
    return ", ".join(f"{counts[name]:,} {name}" + (" (no vector: the cap to every token)" if name == "none" else "")
                     for name in order if counts.get(name) or name == "trained")


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def build_report(result: Any, *, probes: Sequence[str] = (), k: int = 8) -> str:
    """What a build did: sizes, trained coverage, time per stage, and probe neighbourhoods."""
    from ..store import open_store

    st = result.stats
    v, trained = st["vocab_size"], st["n_trained"]
    store = open_store(result.store_path)
    lines = [
        f"store          {result.store_path}",
        f"vocabulary     {v:,} token ids",
        f"corpus         {NO_CORPUS_LINE}" if st.get("corpus_absent") else
        f"corpus         {st['n_tokens']:,} tokens in {st['n_documents']:,} documents "
        f"({st['tokens_per_second'] / 1e6:.2f}M tok/s when tokenized)",
        f"trained        {trained:,} of {v:,} ids ({100 * trained / v:.1f}%)"
        + (f", {st['n_borrowed']:,} borrowed" if st.get("n_borrowed") else ""),
        f"provenance     {provenance_line(store.info()['embeddings']['provenance'])}",
        "",
        _table(
            ["stage", "time", ""],
            [[r.name, _seconds(r.seconds), "cached" if r.cached else ""] for r in result.stages],
            "<><",
        ),
    ]
    metrics = [m for m in store.metrics if m != "l2"] or ["l2"]
    for probe in probes:
        try:
            query = store.resolve(probe)
        except Exception as exc:  # a probe the tokenizer lacks is reported, not fatal
            lines += ["", f"probe {probe!r}: {exc}"]
            continue
        lines += ["", side_by_side(store, query, metrics, k)]
    return "\n".join(lines)


def side_by_side(store: Any, query: int, metrics: Sequence[str], k: int) -> str:
    """The k nearest of ``query`` under several metrics: token, cost and provenance (one
    letter, :data:`PROVENANCE_MARK`, explained under the table) per metric."""
    columns = {m: store.neighbors(query, k=k, metric=m) for m in metrics}
    header = ["#"] + [h for m in metrics for h in (m, "cost", "")]
    rows = []
    for r in range(k):
        row: list[Any] = [r + 1]
        for m in metrics:
            col = columns[m]
            row += ([visible(col[r].text), f"{col[r].cost:.3f}", PROVENANCE_MARK[store.provenance_of(col[r].id)]]
                    if r < len(col) else ["", "", ""])
        rows.append(row)
    title = f"nearest to {visible(store.token_text(query))!s} (id {query}, {store.provenance_of(query)})"
    if not store.usable[query]:
        title += ": it has no vector, so it has no neighbours"
    legend = "provenance: " + ", ".join(f"{mark} {name}" for name, mark in PROVENANCE_MARK.items())
    return title + "\n" + _table(header, rows, ">" + "<><" * len(metrics)) + "\n" + legend


def neighbor_table(store: Any, query: int, rows: Sequence[Any], metric: str) -> str:
    """Rank, id, token (leading space shown as ␣), cost, provenance; the query's provenance
    in the title."""
    title = f"{metric} neighbours of {visible(store.token_text(query))} (id {query}, {store.provenance_of(query)})"
    if not rows:
        return title + ": none (the token has no vector, or the metric stores no neighbours for it)"
    body = _table(["rank", "id", "token", "cost", "provenance"],
                  [[r + 1, n.id, visible(n.text), f"{n.cost:.4f}", store.provenance_of(n.id)] for r, n in enumerate(rows)],
                  ">><><")
    return title + "\n" + body


def info_table(store: Any) -> str:
    """A readable summary of :meth:`MetricStore.info`."""
    info = store.info()
    tok, corpus, emb = info["tokenizer"], info.get("corpus", {}), info.get("embeddings", {})
    lines = [
        f"store        {info['path']}",
        f"schema       v{info['schema_version']}, built by vocabmetric {info['vocabmetric_version']} on {info['created']}",
        f"tokenizer    {tok['spec']}  ({tok['vocab_size']:,} ids, fingerprint {tok['fingerprint'][:16]}…)",
        f"corpus       {NO_CORPUS_LINE}" if corpus.get("absent") else
        f"corpus       {corpus.get('n_tokens', 0):,} tokens, {corpus.get('n_documents', 0):,} documents, "
        f"{len(corpus.get('sources', []))} source file(s)",
        f"embeddings   {emb.get('method')} dim {emb.get('dim')}: {emb.get('n_trained', 0):,} trained"
        + (f", {emb['n_borrowed']:,} borrowed" if emb.get("n_borrowed") else "")
        + _imported_from(emb.get("params") or {}),
        f"provenance   {provenance_line(emb['provenance'])}",
        "",
        _table(
            ["metric", "kind", "k", "cap", "shape", "cap from"],
            [
                [m, a.get("kind", m), a.get("k", "exact" if a.get("exact") else "-"), f"{a.get('cap', float('nan')):.4g}",
                 shape_cell(a.get("shape")), a.get("cap_statistic", "max of unit-vector distance" if a.get("exact") else "")]
                for m, a in info["metrics"].items()
            ],
            "<<><<<",
        ),
    ]
    shaped = [(m, a["shape"]) for m, a in info["metrics"].items() if isinstance(a.get("shape"), dict)]
    lines += [f"shape of {m}: {shape_line(s)}" for m, s in shaped]
    return "\n".join(lines)


def shape_cell(shape: Any) -> str:
    """A metric's cost shaping in a few characters: ``none`` (also for stores built before
    shaping was recorded), ``fraction^3.1``, ``power^2``, ``rank``."""
    if not isinstance(shape, dict):
        return "none"
    exponent = shape.get("exponent")
    return shape.get("shape", "?") + (f"^{exponent:.3g}" if exponent is not None else "")


def shape_line(shape: dict) -> str:
    """One line on a metric's cost shaping: the setting, the fitted exponent, what it keeps."""
    what = shape.get("shape", "?")
    if what == "fraction":
        what += (f" {shape.get('fraction')} at the {shape.get('rank')}th neighbour (its median cost "
                 f"{shape.get('median', float('nan')):.4g})")
    if shape.get("exponent") is not None:
        what += f", cost = cap·(c/cap)^{shape['exponent']:.3g}"
    return f"{what}; keeps {shape.get('keeps', '?')}"
