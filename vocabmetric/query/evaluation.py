"""Metric quality against human similarity judgments (WordSim353, SimLex-999).

For each metric of a store and each dataset, the score is Spearman's rank correlation

    ρ = spearman(−cost(a, b), human_similarity(a, b))

over the dataset's pairs whose two words are each one usable token (trained, borrowed or
composed: ``spearman``), and over *all* pairs whose two words are each one token
(``spearman_all``): there a pair with a token that has no vector (provenance ``none``)
costs the metric's cap, so those pairs tie at the bottom of the ranking. Higher is better
(1: the metric orders the pairs exactly as people do). WordSim353 rates relatedness
("cup"–"coffee" is close), SimLex-999 rates similarity proper ("cup"–"coffee" is far), so
word2vec-style metrics usually score lower on SimLex.

A word is looked up as a single token in the forms ``" word"`` (leading space: the form
inside running text for byte-level BPE), ``"word"``, ``" Word"``, ``"Word"``, in that order;
the first form that is exactly one usable token is used; for ``spearman_all``, a word with
no usable form takes its first form that is one token at all. A pair whose words are not
both usable tokens is not *covered*: ``coverage = n_pairs / n_total`` over the dataset and
``single_coverage = n_pairs / n_single`` over its ``n_single`` single-token pairs.

Truncated metrics (knn, geodesic, umap) store only each token's k nearest: a covered pair
that is not among the stored neighbours costs the cap, so those pairs tie at the bottom of
the ranking (``n_stored`` counts the pairs that were stored). ``l2`` is exact for every pair
and ``tree`` is exact too, so compare a truncated metric with ``l2`` on the same row.

The datasets are the copies shipped in gensim's test data
(``gensim.test.utils.datapath('wordsim353.tsv')``, ``datapath('simlex999.txt')``): tab
separated ``word1 word2 score`` lines after ``#`` comments. Cost: one O(k) / O(d) /
O(depth) lookup per pair; a few milliseconds per metric.

A Spearman over fewer than :data:`MIN_PAIRS` covered pairs is flagged (``!`` in the table
and a warning line): a 1000-token BPE covers a handful of WordSim pairs, too few to rank.

Beside l2 (:func:`metric_contrast`): every metric on the same seeded *trained* pairs (the
tokens whose vectors were learned or imported, not the borrowed or composed ones): the
10-NN contrast (mean cost of 10-NN pairs over the median cost of random pairs, l2's beside
it) and Spearman(metric, l2) over the random pairs. The static near/far price of each
penalty is :mod:`vocabmetric.query.price`'s.

Example
-------
>>> from vocabmetric import open_store                      # doctest: +SKIP
>>> print(format_eval(evaluate(open_store("runs/demo/metric.zarr"))))   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ..errors import VocabMetricError
from ..store import EXACT_METRICS, TREE

LOG = logging.getLogger(__name__)

#: Dataset name → file name in gensim's test data.
DATASETS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
#: Below this many covered pairs a Spearman is flagged: its 95% interval spans about ±0.35
#: (Fisher z: 1.96/√(n − 3) at n = 30), too wide to rank one metric above another.
MIN_PAIRS = 30


class EvalRow(NamedTuple):
    """One metric on one dataset."""

    metric: str
    dataset: str
    spearman: float  # ρ(−cost, human similarity); NaN when fewer than 3 pairs are covered
    n_pairs: int  # pairs whose words are both single usable tokens (a ρ over < MIN_PAIRS is flagged)
    n_total: int  # pairs in the dataset
    coverage: float  # n_pairs / n_total
    n_stored: int = 0  # covered pairs with a stored cost (not the cap); all of them for l2, tree
    spearman_all: float = float("nan")  # ρ over all n_single pairs, a token with no vector costing the cap
    n_single: int = 0  # pairs whose words are both single tokens, usable or not
    single_coverage: float = 0.0  # n_pairs / n_single


class Pair(NamedTuple):
    word1: str
    word2: str
    similarity: float


def dataset_path(name: str) -> Path:
    """Path of a dataset file in gensim's test data."""
    if name not in DATASETS:
        raise VocabMetricError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")
    from gensim.test.utils import datapath

    return Path(datapath(DATASETS[name]))


def read_pairs(path: str | Path) -> list[Pair]:
    """``word1<TAB>word2<TAB>score`` lines; ``#`` lines and blank lines are skipped."""
    path = Path(path)
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise VocabMetricError(f"cannot read the similarity dataset {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            pairs.append(Pair(fields[0], fields[1], float(fields[2])))
        except (IndexError, ValueError):
            raise VocabMetricError(f"{path}:{number}: expected 'word1<TAB>word2<TAB>score', got {line!r}") from None
    return pairs


def word_forms(word: str) -> list[str]:
    """The token texts tried for a word, in order: " word", "word", " Word", "Word"."""
    cap = word[:1].upper() + word[1:]
    return list(dict.fromkeys([" " + word, word, " " + cap, cap]))


def token_of_word(store, word: str, *, usable_only: bool = True) -> int | None:
    """The id of the first form of ``word`` that is exactly one usable token, else None.

    ``usable_only=False``: failing that, the first form that is exactly one token at all.
    """
    usable = store.usable
    single = [ids[0] for ids in map(store.ids_of_text, word_forms(word)) if len(ids) == 1]
    found = [i for i in single if usable[i]] or ([] if usable_only else single)
    return found[0] if found else None


def evaluate(store, metrics: Sequence[str] | None = None, datasets: Iterable[str] = tuple(DATASETS)) -> list[EvalRow]:
    """Spearman ρ(−cost, human similarity) per metric and dataset (see the module docstring).

    ``metrics`` defaults to every metric of the store (``l2`` first). Unknown metric names
    raise :class:`~vocabmetric.errors.StoreError` listing the store's metrics.
    """
    metrics = list(store.metrics if metrics is None else metrics)
    for m in metrics:
        store._check_metric(m)
    rows = []
    for name in datasets:
        pairs = read_pairs(dataset_path(name))
        a_all, b_all, human_all = _token_pairs(store, pairs)
        usable = store.usable
        both = usable[a_all] & usable[b_all]
        a, b, human = a_all[both], b_all[both], human_all[both]
        for metric in metrics:
            cost_all = _costs_or_cap(store, a_all, b_all, metric)
            cost = cost_all[both]
            stored = len(a)
            if metric in store.metrics and _is_truncated(store, metric):
                stored = int(np.sum((cost < np.float32(store.metric_attrs(metric)["cap"])) | (a == b)))
            rows.append(EvalRow(metric, name, _rho(cost, human), len(a), len(pairs),
                                len(a) / len(pairs) if pairs else 0.0, stored, _rho(cost_all, human_all),
                                len(a_all), len(a) / len(a_all) if len(a_all) else 0.0))
    return rows


def _token_pairs(store, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (each word's usable form first) and human scores of the single-token pairs."""
    found = [(token_of_word(store, p.word1, usable_only=False), token_of_word(store, p.word2, usable_only=False),
              p.similarity) for p in pairs]
    found = [f for f in found if f[0] is not None and f[1] is not None]
    return (np.array([f[0] for f in found], dtype=np.int64), np.array([f[1] for f in found], dtype=np.int64),
            np.array([f[2] for f in found], dtype=np.float64))


def _costs_or_cap(store, a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """The metric's costs, with the cap for a pair of distinct tokens one of which has no vector."""
    if not len(a):
        return np.zeros(0)
    cost = store.pair_costs(a, b, metric).astype(np.float64)
    usable = store.usable
    return np.where((usable[a] & usable[b]) | (a == b), cost, np.float64(np.float32(store._cap(metric))))


def _rho(cost: np.ndarray, human: np.ndarray) -> float:
    """Spearman ρ(−cost, human), ties by average rank; NaN under 3 pairs or a constant cost."""
    from scipy.stats import spearmanr

    return float(spearmanr(-cost, human).statistic) if len(cost) >= 3 and np.ptp(cost) > 0 else float("nan")


def _is_truncated(store, metric: str) -> bool:
    return metric not in EXACT_METRICS and metric != TREE


def format_eval(rows: Sequence[EvalRow]) -> str:
    """A plain-text table of :func:`evaluate`'s rows, with how to read it."""
    header = (f"{'metric':<12} {'dataset':<12} {'spearman':>9} {'pairs':>9} {'coverage':>9} {'all-pairs':>10} "
              f"{'1-token':>8} {'covered':>8} {'stored':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        rho, rho_all = ("n/a" if np.isnan(x) else f"{x:+.3f}" for x in (r.spearman, r.spearman_all))
        stored = f"{r.n_stored / r.n_pairs:.0%}" if r.n_pairs else "-"
        flag = "!" if r.n_pairs < MIN_PAIRS else " "
        lines.append(f"{r.metric:<12} {r.dataset:<12} {rho:>9}{flag}{f'{r.n_pairs}/{r.n_total}':>9} "
                     f"{r.coverage:>9.1%} {rho_all:>10} {r.n_single:>8} {r.single_coverage:>8.1%} {stored:>7}")
    lines += [
        "",
        "spearman: rank correlation of -cost with human similarity over the covered pairs (higher is better);",
        "pairs, coverage: pairs whose two words are each one usable token (' word', 'word', ' Word', 'Word').",
        "all-pairs: the same over all 1-token pairs (both words single tokens, usable or not), a token with",
        "no vector costing the cap (those pairs tie); covered: the usable share of the 1-token pairs.",
        "stored: covered pairs with a stored cost; in truncated metrics (knn, geodesic, umap) the others",
        "cost the cap and tie. l2 and tree are exact for every pair.",
    ]
    return "\n".join(lines + few_pairs_warnings(rows))


def few_pairs_warnings(rows: Sequence[EvalRow]) -> list[str]:
    """One warning line per dataset whose Spearman rests on fewer than :data:`MIN_PAIRS`
    covered pairs (marked ``!`` in the table); none when every dataset has enough."""
    few = {r.dataset: r.n_pairs for r in rows if r.n_pairs < MIN_PAIRS}
    return [f"warning: {name}'s spearman rests on {n} pair{'s' if n != 1 else ''} (< {MIN_PAIRS}): too few to rank "
            f"metrics; its 95% interval is wider than ±0.35" for name, n in few.items()]


# -- every metric beside l2: fidelity and contrast over trained pairs ------------------------
#: Random trained pairs of the contrast measurement, and the tokens whose 10 nearest make its near pairs.
FIDELITY_PAIRS = 20000
FIDELITY_SOURCES = 2000
FIDELITY_NEAR = 10
#: Which tokens the random and near pairs are drawn from: the trained ones (their vectors
#: were learned, or imported); borrowed and composed vectors are built from them.
PAIRS = "trained"


class MetricContrast(NamedTuple):
    """One metric beside l2 over trained pairs (see :func:`metric_contrast`)."""

    metric: str
    contrast: float  # mean cost of 10-NN pairs ÷ median cost of random pairs
    l2_contrast: float  # the same ratio under l2, on the same pairs
    spearman: float  # ρ(cost, l2) over the random pairs (truncated metrics: most tie at the cap)
    near_spearman: float  # ρ(cost, l2) over the 10-NN pairs
    n_random: int
    n_near: int
    pairs: str = PAIRS  # the tokens the pairs were drawn from


def trained_pairs(store, *, n_pairs: int = FIDELITY_PAIRS, n_sources: int = FIDELITY_SOURCES,
                  seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((a, b), (i, j))``: ``n_pairs`` random pairs of distinct trained tokens, and each of
    ``n_sources`` random trained tokens with its :data:`FIDELITY_NEAR` nearest trained tokens
    under l2 (the store's exact faiss index, searched deep enough to skip borrowed and
    composed tokens). Seeded."""
    from .._util.vectors import normalized

    trained = np.asarray(store.trained, bool) & np.asarray(store.usable, bool)
    ids = np.flatnonzero(trained)
    if len(ids) < FIDELITY_NEAR + 2:
        raise VocabMetricError(f"the contrast needs at least {FIDELITY_NEAR + 2} trained tokens, the store has {len(ids)}")
    rng = np.random.default_rng(seed)
    a, b = rng.choice(ids, n_pairs), rng.choice(ids, n_pairs)
    a, b = a[a != b], b[a != b]
    src = rng.choice(ids, min(n_sources, len(ids)), replace=False)
    share = len(ids) / max(int(np.sum(store.usable)), 1)  # trained share of the index: search deeper when small
    depth = min(int(np.ceil((FIDELITY_NEAR + 1) / share * 1.5)) + 8, int(np.sum(store.usable)))
    _, found = store.faiss_index().search(normalized(store.embeddings()[src]).astype(np.float32), depth)
    ok = (found >= 0) & (found != src[:, None]) & trained[np.maximum(found, 0)]
    ok &= np.cumsum(ok, axis=1) <= FIDELITY_NEAR
    i, j = np.broadcast_to(src[:, None], found.shape)[ok], found[ok].astype(np.int64)
    return (a, b), (i, j)


def metric_contrast(store, metrics: Sequence[str] | None = None, *, n_pairs: int = FIDELITY_PAIRS,
                    n_sources: int = FIDELITY_SOURCES, seed: int = 0) -> list[MetricContrast]:
    """Every metric beside l2 on the same trained pairs (:func:`trained_pairs`).

    ``contrast = mean cost of the 10-NN pairs / median cost of the random pairs``: how much
    of a stranger's price a neighbour costs (lower: near is cheaper). A metric that keeps
    l2's ordering has ``spearman`` near 1 (meaningful for the exact ones, l2 and tree; a
    truncated metric stores only near pairs, so its random pairs tie at the cap). Seeded;
    cost O(n_pairs·(d + depth or k)) per metric plus one faiss search of ``n_sources`` rows.
    """
    from scipy.stats import spearmanr

    metrics = list(store.metrics if metrics is None else metrics)
    (a, b), (i, j) = trained_pairs(store, n_pairs=n_pairs, n_sources=n_sources, seed=seed)
    l2_r, l2_n = (store.pair_costs(x, y, "l2").astype(np.float64) for x, y in ((a, b), (i, j)))
    l2_contrast = float(l2_n.mean() / np.median(l2_r))
    rows = []
    for metric in metrics:
        cost_r, cost_n = (store.pair_costs(x, y, metric).astype(np.float64) for x, y in ((a, b), (i, j)))
        rho = (lambda x, y: float(spearmanr(x, y).statistic) if np.ptp(x) > 0 else float("nan"))
        rows.append(MetricContrast(metric, float(cost_n.mean() / np.median(cost_r)), l2_contrast, rho(cost_r, l2_r),
                                   rho(cost_n, l2_n), len(a), len(i)))
    return rows


def format_contrast(rows: Sequence[MetricContrast]) -> str:
    """A table of :func:`metric_contrast`'s rows, with how to read it."""
    if not rows:
        return ""
    header = f"{'metric':<12} {'10-NN contrast':>15} {'÷ l2':>6} {'spearman(·, l2)':>16} {'10-NN spearman':>15}"
    lines = [header, "-" * len(header)]
    for r in rows:
        rho, near = ("n/a" if np.isnan(x) else f"{x:.3f}" for x in (r.spearman, r.near_spearman))
        lines.append(f"{r.metric:<12} {r.contrast:>15.3f} {r.contrast / r.l2_contrast:>6.2f} {rho:>16} {near:>15}")
    r = rows[0]
    lines += [
        "",
        f"over {r.pairs} tokens only: {r.n_random} random pairs, {r.n_near} {FIDELITY_NEAR}-NN pairs (l2 nearest).",
        f"10-NN contrast: mean cost of the {FIDELITY_NEAR}-NN pairs / median cost of the random pairs (lower: a",
        "neighbour is cheaper than a stranger); ÷ l2: beside l2's. spearman(·, l2): over the random pairs (a",
        "truncated metric's random pairs mostly cost the cap and tie; it is meaningful for l2 and tree).",
    ]
    return "\n".join(lines)


class TreeFidelity(NamedTuple):
    """How well the tree keeps the l2 metric (see :func:`tree_fidelity`)."""

    spearman: float  # ρ(tree cost, l2) over random trained pairs
    tree_contrast: float  # mean tree cost of 10-NN pairs ÷ median tree cost of random pairs
    l2_contrast: float  # the same ratio under l2
    near_spearman: float  # ρ(tree cost, l2) over the 10-NN pairs
    n_random: int
    n_near: int
    n_trees: int
    pairs: str = PAIRS


def tree_fidelity(store, *, n_pairs: int = FIDELITY_PAIRS, n_sources: int = FIDELITY_SOURCES, seed: int = 0) -> TreeFidelity:
    """Spearman(tree cost, l2) over ``n_pairs`` random *trained* pairs, and the near/random
    contrast: :func:`metric_contrast` of the tree. A tree that keeps the metric has
    ``spearman`` near 1 and ``tree_contrast`` near ``l2_contrast``."""
    (row,) = metric_contrast(store, [TREE], n_pairs=n_pairs, n_sources=n_sources, seed=seed)
    return TreeFidelity(row.spearman, row.contrast, row.l2_contrast, row.near_spearman, row.n_random, row.n_near,
                        int(getattr(store, "n_trees", 1)))


def format_fidelity(f: TreeFidelity) -> str:
    """Three lines: the tree's Spearman against l2 and its contrast beside l2's."""
    return "\n".join([
        f"tree fidelity ({f.n_trees} tree{'s' if f.n_trees != 1 else ''}): spearman(tree, l2) {f.spearman:.3f} over "
        f"{f.n_random} random {f.pairs} pairs; {FIDELITY_NEAR}-NN spearman {f.near_spearman:.3f}",
        f"near/random contrast (mean {FIDELITY_NEAR}-NN cost / median random cost): tree {f.tree_contrast:.3f}, "
        f"l2 {f.l2_contrast:.3f}",
        "a tree that keeps the metric has spearman near 1 and a contrast close to l2's.",
    ])
