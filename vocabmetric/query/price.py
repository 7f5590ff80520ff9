"""The static near/far price of a penalty: what it charges for a neighbour over a stranger.

A penalty's semantic discount can be no larger than the gap between what a neighbour and a
stranger cost. This measures that gap on synthetic contexts, before any training:

* **Contexts** (``n_contexts``, seeded). A top token ``t*``, drawn among the trained tokens
  that have a trained nearest neighbour; *near* = its nearest trained token under l2 (the
  store's exact faiss index); *far* = a random trained token outside its
  :data:`FAR_OUTSIDE` nearest. The reference is Zipfian over a random order of the
  vocabulary, ``log π_ref(x) = −ZIPF·log rank(x) − log Z``, with ``t*`` at rank 1 and near
  and far both given the logit of rank :data:`TARGET_RANK`, so they have *equal* reference
  probability.
* **Moves.** ``p_near``: :data:`MOVED` (20%) of ``t*``'s reference mass moved onto near;
  ``p_far``: the same mass onto far. Everything else is the reference.
* **Price** = ``penalty(p_near, π_ref) / penalty(p_far, π_ref)``, the mean over contexts.
  KL sees only probabilities, so its price is exactly 1 (no discount); a Wasserstein
  penalty's is about ``cost(t*, near) / cost(t*, far)`` (exactly so for Tree-Wasserstein,
  whose W1 of one move is the mass times the tree distance). Lower is a larger discount.

Penalties (:func:`store_penalties`): the support-mode Sinkhorn divergence on every stored
truncated metric (``eps`` :data:`SINKHORN_EPS`, ``support`` :data:`SINKHORN_SUPPORT`, the
settings of ``experiments/penalty_experiment.py``; symmetrized as the penalty does, or, where
a hub would make that operator too large, on the mutual neighbours: the metric column says
``(mutual)``), Tree-Wasserstein on the tree (all its
trees), Sliced-Wasserstein on the unit embeddings (64 random directions) and ``full_kl``.
These are static and fast: 2·n_contexts positions per penalty, a few seconds each at V = 100k.

The same prices on a model's own next-token distributions: :func:`near_far_prices` with
``contexts=`` :func:`~vocabmetric.query.model_contexts.model_contexts` (the model's softmax
at seeded positions of real text, t* its top token, near and far picked by
:func:`near_and_far` as here, far's logit set to near's). Both kinds of contexts are the same
arrays (``top``, ``near``, ``far``, ``ref``, ``source``); the moves, penalties and ratio are shared.

Example
-------
>>> print(format_prices(near_far_prices(open_store("metric.zarr"))))   # doctest: +SKIP
>>> # vocabmetric eval metric.zarr --price-model HF_DIR: both, side by side
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from ..errors import VocabMetricError
from ..store import EXACT_METRICS, TREE

#: Contexts of the price list, the share of t*'s mass moved, the reference's Zipf exponent,
#: the rank whose logit near and far share, and how many of t*'s nearest far must avoid.
N_CONTEXTS = 200
MOVED = 0.2
ZIPF = 1.5
TARGET_RANK = 10
FAR_OUTSIDE = 64
SINKHORN_EPS = 0.05
SINKHORN_SUPPORT = 64
#: ``Price.contexts`` of the two kinds of contexts.
SYNTHETIC = "synthetic"
MODEL = "model's own"


class Price(NamedTuple):
    """One penalty's near/far price (see the module docstring)."""

    penalty: str
    metric: str  # the ground cost it reads ("-" for KL)
    price: float  # mean over contexts of penalty(near move) / penalty(far move)
    near: float  # mean penalty of the near move
    far: float  # mean penalty of the far move
    n_contexts: int
    contexts: str = "synthetic"  # SYNTHETIC or MODEL: where the reference distributions came from


def trained_ids(store) -> np.ndarray:
    """The ids a context may use (trained and usable); a :class:`VocabMetricError` when there
    are too few to find a stranger outside a token's :data:`FAR_OUTSIDE` nearest."""
    ids = np.flatnonzero(np.asarray(store.trained, bool) & np.asarray(store.usable, bool))
    if len(ids) < FAR_OUTSIDE + 2:
        raise VocabMetricError(f"the near/far price needs more than {FAR_OUTSIDE + 1} trained tokens, "
                               f"the store has {len(ids)}")
    return ids


def near_and_far(store, top: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(near, far)`` (n,) ids for the top tokens ``top`` (n,): near = each one's nearest trained
    token under l2 (the store's exact faiss index; -1 when none is among its
    :data:`FAR_OUTSIDE` + 1 nearest usable tokens), far = a random trained token outside them
    (drawn from ``rng``). Cost: one exact search of n queries, O(n·V·d)."""
    from .._util.vectors import normalized

    ids = trained_ids(store)
    trained = np.asarray(store.trained, bool) & np.asarray(store.usable, bool)
    depth = min(FAR_OUTSIDE + 1, int(np.sum(store.usable)))
    _, found = store.faiss_index().search(normalized(store.embeddings()[top]).astype(np.float32), depth)
    near = np.full(len(top), -1, np.int64)
    far = np.empty(len(top), np.int64)
    for c in range(len(top)):
        hits = [int(h) for h in found[c] if h >= 0 and h != top[c] and trained[h]]
        near[c] = hits[0] if hits else -1
        avoid = set(hits) | {int(top[c])}
        far[c] = next(x for x in rng.choice(ids, 64) if int(x) not in avoid)
    return near, far


def synthetic_contexts(store, n_contexts: int = N_CONTEXTS, *, seed: int = 0) -> dict[str, Any]:
    """``{"top", "near", "far"}`` (n,) token ids, ``"ref"`` (n, V) float32 reference
    log-probabilities (the module docstring's rule) and ``"source": "synthetic"``. Raises
    :class:`VocabMetricError` when the store has too few trained tokens."""
    ids = trained_ids(store)
    rng = np.random.default_rng(seed)
    top = rng.choice(ids, min(n_contexts, len(ids)), replace=False)
    near, far = near_and_far(store, top, rng)
    keep = near >= 0
    top, near, far = top[keep], near[keep], far[keep]
    vocab_size = store.vocab_size
    logit_of_rank = -ZIPF * np.log(np.arange(1, vocab_size + 1, dtype=np.float64))
    ref = np.empty((len(top), vocab_size), np.float32)
    for c in range(len(top)):
        order = rng.permutation(vocab_size)  # order[r] = the token at rank r + 1
        z = np.empty(vocab_size)
        z[order] = logit_of_rank
        z[order[0]], z[top[c]] = z[top[c]], z[order[0]]  # t* at rank 1
        z[near[c]] = z[far[c]] = logit_of_rank[TARGET_RANK - 1]
        ref[c] = z - np.logaddexp.reduce(z)
    return {"top": top, "near": near, "far": far, "ref": ref, "source": SYNTHETIC}


def moved_logits(contexts: Mapping[str, Any], target: str, moved: float = MOVED) -> np.ndarray:
    """(n, V) float32 log-probabilities: each reference with ``moved`` of its top token's mass
    moved onto ``contexts[target]`` (``"near"`` or ``"far"``)."""
    q = np.exp(contexts["ref"].astype(np.float64))
    rows = np.arange(len(q))
    mass = moved * q[rows, contexts["top"]]
    q[rows, contexts["top"]] -= mass
    q[rows, contexts[target]] += mass
    return np.log(q).astype(np.float32)


#: Largest symmetrized operator (bytes) the price builds; above it the mutual kNN operator is used.
SYMMETRIZED_BYTES = 2 << 30


def union_degree(op) -> int:
    """The widest row of ``op.symmetrized()`` without building it: out-degree plus in-degree,
    an upper bound (a pair stored both ways counts twice). O(V·k)."""
    idx = np.asarray(op.indices)
    out = (idx >= 0).sum(1)
    into = np.bincount(idx[idx >= 0].ravel(), minlength=op.vocab_size)
    return int((out + into).max(initial=0))


def sinkhorn_on(op) -> tuple[Any, str]:
    """Support-mode Sinkhorn (the price's settings) on ``op`` and how it was symmetrized:
    ``"union"`` (the penalty's own ``symmetrized()``) or ``"mutual"`` when the union would
    take more than :data:`SYMMETRIZED_BYTES` (``op.mutual()``: the pairs stored in both directions)."""
    from ..regularizers import SinkhornDivergence

    how = "union"
    if not op.is_symmetric and op.vocab_size * union_degree(op) * 8 > SYMMETRIZED_BYTES:
        op, how = op.mutual(), "mutual"
    return SinkhornDivergence(op, eps=SINKHORN_EPS, support=SINKHORN_SUPPORT, tol=1e-3), how


def store_penalties(store) -> dict[tuple[str, str], Any]:
    """``{(penalty, metric): penalty}``: support-mode Sinkhorn on every stored truncated metric,
    Tree-Wasserstein on the tree, Sliced-Wasserstein on the unit embeddings, and full_kl."""
    from ..regularizers import SlicedWasserstein, TreeWasserstein, full_kl

    out: dict[tuple[str, str], Any] = {("kl", "-"): full_kl}
    for metric in store.metrics:
        if metric != TREE and metric not in EXACT_METRICS:
            penalty, how = sinkhorn_on(store.operator(metric))
            out["sinkhorn", metric if how == "union" else f"{metric} ({how})"] = penalty
    if TREE in store.metrics:
        out["tree", TREE] = TreeWasserstein.from_store(store)
    out["sliced", "embeddings"] = SlicedWasserstein.from_store(store)
    return out


def near_far_prices(store, penalties: Mapping[tuple[str, str], Any] | None = None, *, n_contexts: int = N_CONTEXTS,
                    seed: int = 0, contexts: Mapping[str, Any] | None = None) -> list[Price]:
    """The price of every penalty (default :func:`store_penalties`) on the same contexts:
    ``contexts`` (:func:`synthetic_contexts`' keys, e.g. from
    :func:`~vocabmetric.query.model_contexts.model_contexts`), by default
    ``synthetic_contexts(store, n_contexts, seed=seed)``. Cost: 2·n forward passes of each penalty."""
    import torch

    if contexts is None:
        contexts = synthetic_contexts(store, n_contexts, seed=seed)
    ref = torch.from_numpy(contexts["ref"])
    moves = {t: torch.from_numpy(moved_logits(contexts, t)) for t in ("near", "far")}
    rows = []
    for (name, metric), penalty in (store_penalties(store) if penalties is None else penalties).items():
        with torch.no_grad():
            value = {t: penalty(z, ref).double().numpy() for t, z in moves.items()}
        ratio = value["near"] / np.maximum(value["far"], np.finfo(np.float64).tiny)
        rows.append(Price(name, metric, float(ratio.mean()), float(value["near"].mean()), float(value["far"].mean()),
                          len(ratio), contexts["source"]))
    return rows


def format_prices(rows: Sequence[Price]) -> str:
    """A table of :func:`near_far_prices`' rows, with how to read it; rows of both kinds of
    contexts (synthetic, the model's own) side by side, one price column each."""
    if not rows:
        return ""
    sources = {r.contexts: r.n_contexts for r in rows}
    width = max(12, *(len(r.metric) for r in rows))  # "geodesic (mutual)"
    if len(sources) == 1:
        header = f"{'penalty':<10} {'metric':<{width}} {'near/far price':>15} {'near':>10} {'far':>10}"
        lines = [header, "-" * len(header)]
        lines += [f"{r.penalty:<10} {r.metric:<{width}} {r.price:>15.3f} {r.near:>10.4g} {r.far:>10.4g}" for r in rows]
    else:
        price = {(r.penalty, r.metric, r.contexts): r.price for r in rows}
        header = f"{'penalty':<10} {'metric':<{width}}" + "".join(f" {s:>12}" for s in sources)
        lines = [header, "-" * len(header)]
        for penalty, metric in dict.fromkeys((r.penalty, r.metric) for r in rows):
            cells = [price.get((penalty, metric, s)) for s in sources]
            lines.append(f"{penalty:<10} {metric:<{width}}" + "".join(f" {'-' if c is None else f'{c:.3f}':>12}" for c in cells))
    lines += ["", f"near/far price: the penalty of moving {MOVED:.0%} of the top token's mass onto its nearest trained",
              "neighbour, over moving it onto a stranger of equal reference probability (1.0 = no discount, as KL;",
              "lower: near is cheaper). No training. References:"]
    if SYNTHETIC in sources:
        lines.append(f"  near/far price over {sources[SYNTHETIC]} synthetic contexts (seeded): Zipfian, near and far "
                     f"at rank {TARGET_RANK}")
    if MODEL in sources:
        lines += [f"  near/far price over {sources[MODEL]} positions of the model's own next-token distributions",
                  "  (seeded, real text): its softmax, t* its top token, far's logit set to near's"]
    return "\n".join(lines)
