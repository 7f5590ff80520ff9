"""Cost shaping: a monotone transform of a metric's costs that gives neighbours a real contrast.

In hundreds of dimensions every distance is alike: on SmolLM2-135M's own input embeddings
a 10-NN pair costs 0.75 of a random pair under l2 (the cl100k demo's word2vec: 0.29), so a
Wasserstein penalty on that cost charges a neighbour almost what it charges a stranger.
A shape maps each cost ``c`` in ``[0, cap]`` to ``c'`` in ``[0, cap]``, increasing in ``c``:

==============  ==========================================  ===============================
``shape``       ``c'``                                      keeps
==============  ==========================================  ===============================
``"none"``      ``c``                                       everything
``"power"``     ``cap·(c/cap)^α``, α = ``shape_exponent``   symmetry; the triangle
                                                            inequality iff α ≤ 1
``"fraction"``  ``cap·(c/cap)^α``, α fitted so that the     the same, for the fitted α
                median cost of each trained token's
                ``shape_rank``-th neighbour becomes
                ``shape_fraction·cap``:
                ``α = ln(fraction) / ln(m_rank / cap)``
``"rank"``      ``cap·r/(k+1)`` for the r-th of the k       neither: rank r of j in i's
                stored neighbours of a row                  row is not i's in j's row
==============  ==========================================  ===============================

Every shape keeps the cap (``c = cap ↦ cap``), zero (``0 ↦ 0``; ``"rank"``: the diagonal),
and each row's order, so the stored neighbour lists are unchanged and a metric's
Spearman against human judgments moves only through ties (``"rank"``: across rows). The
power maps keep symmetry because ``c'(i, j)`` depends on ``c(i, j)`` alone. The triangle
inequality: ``t ↦ t^α`` with ``0 < α ≤ 1`` is concave, increasing and 0 at 0, hence
subadditive, so a metric stays a metric; with ``α > 1`` (what a contrast needs: it makes
``c'(near)/c'(far)`` smaller than ``c(near)/c(far)``) three points on a line break it. So a
shape that raises the contrast cannot keep the triangle inequality: a pointwise map that
lowers every ratio ``c'(a)/c'(b)`` for ``a < b`` has ``c'(t)/t`` increasing, hence is
superadditive. Optimal transport needs no triangle inequality of its ground cost
(Sinkhorn takes any cost); Tree-Wasserstein's tree distance is a metric whatever targets
its weights were fitted to.

A setting that would break a claim is a :class:`~vocabmetric.errors.ConfigError` naming
it: an exponent ≤ 0 (not increasing: a neighbour would cost more than a stranger), a
fraction outside (0, 1), an unknown shape.

Cost: O(V·k) for a truncated table; the fitted exponent reads one column of it.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from ..errors import ConfigError, VocabMetricError

LOG = logging.getLogger(__name__)

SHAPES = ("none", "power", "fraction", "rank")
#: The config keys of a shape, beside ``shape`` itself.
SHAPE_KEYS = ("shape", "shape_exponent", "shape_fraction", "shape_rank")


class CostShape:
    """A monotone transform of a metric's costs (see the module docstring).

    Parameters
    ----------
    shape : {"none", "power", "fraction", "rank"}
    exponent : float
        α of ``"power"`` (> 0).
    fraction : float
        ``"fraction"``: the share of the cap that the median ``rank``-th neighbour costs, in (0, 1).
    rank : int
        ``"fraction"``: which neighbour (1 = the nearest).

    After :meth:`fit`: ``exponent_`` (the α applied; 1 for ``"none"``, None for ``"rank"``),
    ``params_`` (a plain dict for the store's attrs: the setting, α, and which properties it keeps).
    """

    def __init__(self, shape: str = "none", *, exponent: float = 1.0, fraction: float = 0.25, rank: int = 10):
        self.shape, self.exponent, self.fraction, self.rank = shape, exponent, fraction, rank

    @classmethod
    def from_table(cls, table: dict) -> "CostShape":
        """From a config table's ``shape*`` keys (:data:`SHAPE_KEYS`); absent keys take the defaults."""
        kw = {key.removeprefix("shape_"): table[key] for key in SHAPE_KEYS[1:] if key in table}
        return cls(table.get("shape", "none"), **kw)

    def validate(self, where: str | None = None) -> "CostShape":
        """Raise :class:`ConfigError` naming the setting that would break a claimed property."""
        where = where or "CostShape:"
        if self.shape not in SHAPES:
            raise ConfigError(f"{where} shape must be one of {', '.join(map(repr, SHAPES))}, got {self.shape!r}")
        number = lambda x: isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)
        if not (number(self.exponent) and self.exponent > 0):
            raise ConfigError(f"{where} shape_exponent = {self.exponent!r} must be a finite number > 0: with an "
                              "exponent <= 0 the cost is not increasing in the distance (a neighbour would cost "
                              "as much as a stranger or more)")
        if not (number(self.fraction) and 0 < self.fraction < 1):
            raise ConfigError(f"{where} shape_fraction = {self.fraction!r} must be in (0, 1): the share of the cap "
                              "that the shape_rank-th neighbour costs (1 or more would not be increasing)")
        if not (isinstance(self.rank, (int, np.integer)) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ConfigError(f"{where} shape_rank must be an integer >= 1, got {self.rank!r}")
        return self

    def fit(self, rank_costs: np.ndarray, cap: float, where: str = "CostShape:") -> "CostShape":
        """Fix α. ``rank_costs``: each trained token's ``rank``-th neighbour cost (only
        ``"fraction"`` reads it); ``cap``: the metric's cap. Raises :class:`VocabMetricError`
        when the median neighbour already costs the cap (no exponent can lower it)."""
        self.validate(where)
        if self.shape == "none":
            self.exponent_ = 1.0
        elif self.shape == "power":
            self.exponent_ = float(self.exponent)
        elif self.shape == "rank":
            self.exponent_ = None
        else:
            costs = np.asarray(rank_costs, np.float64)
            costs = costs[np.isfinite(costs)]
            median = float(np.median(costs)) if costs.size else float("nan")
            if not 0 < median < cap:
                raise VocabMetricError(f"{where} shape = 'fraction' needs the median cost of the {self.rank}-th "
                                       f"neighbour strictly between 0 and the cap {cap:.4g}, got {median:.4g}; "
                                       "lower shape_rank or use shape = 'power'")
            self.exponent_ = math.log(self.fraction) / math.log(median / cap)
            self.median_ = median
            if self.exponent_ < 1:
                warnings.warn(
                    f"{where} shape_fraction = {self.fraction:g} flattens this cost instead of sharpening it: its "
                    f"{self.rank}-th neighbour already costs {median / cap:.3g} of the cap, so the fitted exponent "
                    f"is {self.exponent_:.3g} < 1 and a neighbour costs more of a stranger's price than unshaped; "
                    f"set shape_fraction below {median / cap:.3g} to sharpen it, or shape = 'none'", UserWarning,
                    stacklevel=2)
        self.params_ = self._params(cap)
        LOG.info("%s %s", where, self.params_["keeps"])
        return self

    def _params(self, cap: float) -> dict[str, Any]:
        params: dict[str, Any] = {"shape": self.shape}
        if self.shape == "fraction":
            params.update(fraction=float(self.fraction), rank=int(self.rank), median=self.median_)
        if self.exponent_ is not None:
            params["exponent"] = self.exponent_
        params["keeps"] = self.keeps()
        return params

    def keeps(self) -> str:
        """Which metric properties the fitted shape keeps, in words (stored with the metric)."""
        if self.shape == "none":
            return "symmetry and the triangle inequality, as built"
        if self.shape == "rank":
            return "row order and the cap only: not symmetric (symmetrized by the penalty), no triangle inequality"
        if self.exponent_ <= 1:
            return f"symmetry and the triangle inequality (exponent {self.exponent_:.3g} <= 1)"
        return f"symmetry, not the triangle inequality (exponent {self.exponent_:.3g} > 1)"

    def transform(self, costs: np.ndarray, cap: float, indices: np.ndarray | None = None) -> np.ndarray:
        """The shaped costs (same shape, float64), clipped into ``[0, cap]``. ``"rank"`` needs a
        (V, k) table sorted by cost with its ``indices`` (-1 = empty slot, left at the cap)."""
        c = np.clip(np.asarray(costs, np.float64), 0.0, cap)
        if self.shape == "rank":
            if indices is None or c.ndim != 2:
                raise VocabMetricError("shape = 'rank' shapes a (V, k) neighbour table, not single costs")
            k = c.shape[1]
            ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.float64), c.shape)
            return np.where(np.asarray(indices) >= 0, cap * ranks / (k + 1), cap)
        return cap * (c / cap) ** self.exponent_


def shape_table(builder: Any, shape: CostShape, where: str) -> Any:
    """Shape a fitted truncated builder's ``costs_`` in place (cap and indices unchanged) and
    record the shape in its ``params_["shape"]``; the ``rank``-th column gives
    ``"fraction"`` its median (over rows with that slot filled). Returns the builder."""
    indices, costs, cap = builder.indices_, builder.costs_, float(builder.cap_)
    column = min(shape.rank, costs.shape[1]) - 1
    if shape.shape == "fraction" and shape.rank > costs.shape[1]:
        raise ConfigError(f"{where} shape_rank = {shape.rank} exceeds the {costs.shape[1]} stored neighbours; "
                          "lower shape_rank or raise k")
    filled = indices[:, column] >= 0
    shape.fit(costs[filled, column], cap, where)
    shaped = shape.transform(costs, cap, indices)
    builder.costs_ = np.minimum(np.where(indices >= 0, shaped, cap), cap).astype(np.float32)
    builder.params_ = {**builder.params_, "shape": shape.params_}
    return builder
