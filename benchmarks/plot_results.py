"""Chart of the regularizers benchmark: each regularizer's time and memory beside ``full_kl``.

Reads a result of ``benchmarks/regularizers.py`` (``benchmarks/results/regularizers.json``)
and draws, per N (positions), the forward+backward time and the peak extra memory of every
regularizer as a ratio to ``full_kl`` in the same run (the dashed line at 1), against V,
log-log::

    .venv/bin/python benchmarks/plot_results.py benchmarks/results/regularizers.json --out docs/regularizers.png

The figure is made and saved by :func:`vocabmetric.query.plots.new_figure` and
:func:`vocabmetric.query.plots.save_png`, like the store pictures of ``vocabmetric plot``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vocabmetric.errors import ConfigError, VocabMetricError
from vocabmetric.query.plots import new_figure, parse_size, save_png


def bench_rows(results: Any) -> list[dict]:
    """The measured rows of a regularizers benchmark result (a dict with ``rows``, or a list
    of rows), each with ``V``, ``N``, ``regularizer``, ``time_ratio`` and ``memory_ratio``.

    Tolerant: skipped rows (``"skipped"``) are dropped; a ratio missing from a row is computed
    from ``seconds``/``peak_extra_mb`` against the ``full_kl`` row of the same V and N.
    """
    rows = results.get("rows") if isinstance(results, dict) else results
    if not isinstance(rows, list):
        raise ConfigError("a regularizers benchmark result is a list of rows or a dict with 'rows'; got "
                          f"{type(rows).__name__}")
    rows = [r for r in rows if isinstance(r, dict) and not r.get("skipped") and {"V", "regularizer"} <= r.keys()]
    base = {(r["V"], r.get("N")): r for r in rows if r["regularizer"] == "full_kl"}
    out = []
    for r in rows:
        r = dict(r)
        b = base.get((r["V"], r.get("N")))
        for ratio, value in (("time_ratio", "seconds"), ("memory_ratio", "peak_extra_mb")):
            if r.get(ratio) is None and b is not None and r.get(value) is not None and b.get(value):
                r[ratio] = r[value] / b[value]
        out.append(r)
    return out


def read_results(path: str | Path) -> Any:
    """The parsed JSON at ``path``; a :class:`ConfigError` that names the file otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"benchmark results {path} do not exist; run `python benchmarks/regularizers.py`") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"benchmark results {path} are not valid JSON: {exc}") from None


def plot_bench(results: str | Path | Any, out: str | Path, *, size: tuple[int, int] | None = None) -> Path:
    """Each regularizer's forward+backward time and peak memory as a ratio to ``full_kl``
    (the dashed line at 1) against V, log-log; one row of panels per N (positions)."""
    if isinstance(results, (str, Path)):
        results = read_results(results)
    rows = bench_rows(results)
    if not rows:
        raise ConfigError("the benchmark results hold no measured rows (every row skipped, or none)")
    positions = sorted({r.get("N") for r in rows}, key=lambda n: (n is None, n or 0))
    names = list(dict.fromkeys(r["regularizer"] for r in rows if r["regularizer"] != "full_kl"))
    size = size or (1200, 80 + 360 * len(positions))
    fig, axes = new_figure(size, rows=len(positions), cols=2)
    for row, n in enumerate(positions):
        for col, (ratio, label) in enumerate((("time_ratio", "time / full_kl"), ("memory_ratio", "peak memory / full_kl"))):
            ax = axes[row, col]
            ax.axhline(1.0, color="black", ls="--", lw=1, label="full_kl")
            for c, name in enumerate(names):
                pts = sorted((r["V"], r[ratio]) for r in rows
                             if r["regularizer"] == name and r.get("N") == n and r.get(ratio) is not None)
                if pts:
                    v, y = zip(*pts)
                    ax.plot(v, np.maximum(y, 1e-3), marker="o", color=f"C{c % 10}", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("V (vocabulary size)")
            ax.set_ylabel(label)
            ax.set_title(f"{label}" + (f", N = {n} positions" if n is not None else ""), fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="best")
    machine = results.get("machine", {}) if isinstance(results, dict) else {}
    note = f" — {machine.get('cpu', '')}, {machine.get('cores', '?')} cores (shared: read the ratios)" if machine else ""
    fig.suptitle(f"regularizers beside full_kl, forward + backward{note}", fontsize=11)
    return save_png(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a regularizers benchmark result, e.g. benchmarks/results/regularizers.json")
    parser.add_argument("--out", "-o", required=True, help="output .png file")
    parser.add_argument("--size", help="WIDTHxHEIGHT in pixels (default: 1200 wide, 360 high per N)")
    args = parser.parse_args(argv)
    try:
        path = plot_bench(args.results, args.out, size=parse_size(args.size) if args.size else None)
    except VocabMetricError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
