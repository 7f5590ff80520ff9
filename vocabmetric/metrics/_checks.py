"""What every metric builder shares: input checks, the cap policy and the fitted (V, k) state.

Inputs: ``embeddings`` (V, d) float32 (row i = token id i), ``trained`` (V,) bool, a
precomputed kNN table ``(indices (V, k), distances (V, k))``.

The cap policy (:func:`choose_cap`): the cap is the :data:`CAP_QUANTILE` quantile of the
metric over :data:`CAP_PAIRS` random trained pairs (:func:`random_pairs`), raised to the
largest stored cost when that is higher; a given cap must be finite, > 0 and >= every
stored cost.

Argument checks (:func:`check_integer`, :func:`check_cap`, :func:`check_flag`) need no
embeddings: every builder's ``validate()`` runs them at config load and at the start of
``fit``, and raises :class:`~vocabmetric.errors.ConfigError` naming the argument and value.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import ConfigError, CorpusError, VocabMetricError
from ..cost import CostOperator

LOG = logging.getLogger(__name__)

#: Random trained pairs sampled to set the default cap.
CAP_PAIRS = 20000
#: The default cap is this quantile of the metric over random trained pairs.
CAP_QUANTILE = 0.99


def check_inputs(embeddings: Any, trained: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(embeddings, trained)`` and return them as float32 (V, d) and bool (V,).

    Raises :class:`VocabMetricError` naming the offending shape, row or value.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
        raise VocabMetricError(f"{what}: embeddings must be a (V, d) array with V >= 2, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.number):
        raise VocabMetricError(f"{what}: embeddings must be numeric, got dtype {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    vocab_size = emb.shape[0]
    if trained is None:
        mask = np.ones(vocab_size, dtype=bool)
    else:
        mask = np.asarray(trained)
        if mask.shape != (vocab_size,):
            raise VocabMetricError(
                f"{what}: trained must have shape ({vocab_size},) to match embeddings {emb.shape}, "
                f"got {mask.shape}"
            )
        if mask.dtype != bool:
            if not np.all(np.isin(mask, (0, 1))):
                raise VocabMetricError(f"{what}: trained must be a boolean mask, got dtype {mask.dtype}")
            mask = mask.astype(bool)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise VocabMetricError(
            f"{what}: embeddings row {row} (token id {row}) has a NaN or infinite value "
            f"({(~finite).sum()} such rows); fix the embedding step before building metrics"
        )
    zero = mask & (np.einsum("ij,ij->i", emb, emb) == 0)
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise VocabMetricError(
            f"{what}: trained token id {row} has an all-zero embedding, which has no direction; "
            "mark it untrained or fix its embedding"
        )
    return emb, mask


def argument_where(builder: Any, where: str | None) -> str:
    """The prefix of an argument error: ``where`` (a config table, ``"[metrics.umap]"``) or
    the builder's class name."""
    return where or f"{type(builder).__name__}:"


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_integer(where: str, name: str, value: Any, low: int, *, unset: bool = False, also: tuple = ()) -> None:
    """``value`` is an integer >= ``low`` (or one of ``also``, or None when ``unset``)."""
    if (unset and value is None) or (_is_integer(value) and (value >= low or value in also)):
        return
    allowed = ", ".join([f"an integer >= {low}", *map(str, also)]) + (" or unset" if unset else "")
    raise ConfigError(f"{where} {name} must be {allowed}, got {value!r}")


def check_cap(where: str, cap: Any) -> None:
    """A given cap is a finite number > 0 (None: derived from the data)."""
    number = isinstance(cap, (int, float, np.number)) and not isinstance(cap, bool)
    if cap is not None and not (number and np.isfinite(cap) and cap > 0):
        raise ConfigError(f"{where} cap={cap!r} must be finite and > 0")


def check_flag(where: str, name: str, value: Any) -> None:
    """``value`` is True, False or None."""
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{where} {name} must be true, false or unset, got {value!r}")


def check_k(k: int, n_trained: int, what: str, name: str = "k") -> int:
    """``k`` as an int, checked: a positive integer below the number of trained tokens."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise VocabMetricError(f"{what}: {name} must be a positive integer, got {k!r}")
    if k >= n_trained:
        raise CorpusError(
            f"{what}: {name}={k} must be smaller than the number of tokens with a vector ({n_trained}: "
            f"trained, borrowed or composed); lower {name} or train on a larger corpus"
        )
    return int(k)


def check_knn(knn: Any, vocab_size: int, need: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a precomputed kNN table ``(indices (V, >=need), distances)``; return its first
    ``need`` columns as int64 and float64."""
    try:
        idx, dist = knn
    except (TypeError, ValueError):
        raise VocabMetricError(f"{what}: knn must be a pair (indices, distances), got {type(knn).__name__}") from None
    idx, dist = np.asarray(idx), np.asarray(dist)
    if idx.ndim != 2 or idx.shape != dist.shape or idx.shape[0] != vocab_size:
        raise VocabMetricError(
            f"{what}: knn indices {idx.shape} and distances {dist.shape} must both be ({vocab_size}, k)"
        )
    if idx.shape[1] < need:
        raise VocabMetricError(
            f"{what}: the precomputed knn has {idx.shape[1]} neighbours per token but {need} are "
            f"needed; build KnnMetric with k >= {need}"
        )
    return idx[:, :need].astype(np.int64), dist[:, :need].astype(np.float64)


def random_pairs(trained_ids: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random pairs of trained token ids, the pairs of one id with itself dropped."""
    rng = np.random.default_rng(seed)
    a = rng.choice(trained_ids, n_pairs)
    b = rng.choice(trained_ids, n_pairs)
    keep = a != b
    return a[keep], b[keep]


def choose_cap(sample: np.ndarray, stored: np.ndarray, cap: float | None, what: str) -> tuple[float, str]:
    """The cap and the statistic that set it (see the module docstring).

    ``sample``: the metric over random trained pairs; ``stored``: every stored cost.
    """
    stored_max = float(stored.max()) if stored.size else 0.0
    if cap is not None:
        cap = float(cap)
        if not np.isfinite(cap) or cap <= 0 or cap < stored_max:
            raise VocabMetricError(
                f"{what}: cap={cap} must be finite, > 0 and >= the largest stored cost {stored_max:.6g}"
            )
        return cap, "given"
    sample = sample[np.isfinite(sample)]
    quantile = float(np.quantile(sample, CAP_QUANTILE)) if sample.size else 0.0
    statistic = f"max(p{CAP_QUANTILE * 100:g} of {sample.size} random trained pairs, max stored cost)"
    value = max(quantile, stored_max)
    if value <= 0:  # all tokens identical: any positive cap bounds the zero costs
        value, statistic = 1.0, "1.0 (every sampled distance was 0)"
    return value, statistic


class TruncatedMetricBase:
    """Shared state and helpers of the (V, k) truncated metrics (see :mod:`vocabmetric.metrics`).

    Not :class:`vocabmetric.store.TruncatedMetric`, the arrays the store keeps: this is the
    builder base class that produces them.
    """

    kind = "?"
    #: Cost shaping (:mod:`._shape`); builders that take it set these in ``__init__``.
    shape, shape_exponent, shape_fraction, shape_rank = "none", 1.0, 0.25, 10
    indices_: np.ndarray
    costs_: np.ndarray
    cap_: float
    params_: dict

    def to_operator(self, fingerprint: str | None = None) -> CostOperator:
        """The fitted metric as a :class:`CostOperator`."""
        if not hasattr(self, "indices_"):
            raise VocabMetricError(f"{type(self).__name__} is not fitted; call fit(embeddings, trained) first")
        return CostOperator(self.indices_, self.costs_, self.cap_, fingerprint)

    def _finish(self, indices: np.ndarray, costs: np.ndarray, sample: np.ndarray, cap: float | None, **params: Any):
        """Sort rows, fill empty slots with the cap, set ``indices_, costs_, cap_, params_``."""
        valid = indices >= 0
        order = np.argsort(np.where(valid, costs, np.inf), axis=1, kind="stable")
        indices = np.take_along_axis(indices, order, 1)
        costs = np.take_along_axis(costs, order, 1)
        valid = indices >= 0
        self.cap_, statistic = choose_cap(sample, costs[valid], cap, type(self).__name__)
        self.indices_ = np.ascontiguousarray(indices, dtype=np.int32)
        self.costs_ = np.ascontiguousarray(np.where(valid, costs, self.cap_), dtype=np.float32)
        # float32 rounding may lift a stored cost a hair above a cap that equals it
        self.costs_ = np.minimum(self.costs_, np.float32(self.cap_))
        self.params_ = {"kind": self.kind, "k": int(indices.shape[1]), "cap": self.cap_, "cap_statistic": statistic, **params}
        LOG.info("%s: V=%d k=%d cap=%.4g (%s)", type(self).__name__, len(indices), indices.shape[1], self.cap_, statistic)
        if self.shape != "none":
            from ._shape import shape_table

            shape_table(self, self.cost_shape(), f"{type(self).__name__}:")
        return self

    def cost_shape(self):
        """The builder's :class:`~vocabmetric.metrics.CostShape` (not fitted)."""
        from ._shape import CostShape

        return CostShape(self.shape, exponent=self.shape_exponent, fraction=self.shape_fraction, rank=self.shape_rank)

    def _set_shape(self, shape: str, exponent: float, fraction: float, rank: int) -> None:
        self.shape, self.shape_exponent, self.shape_fraction, self.shape_rank = shape, exponent, fraction, rank
