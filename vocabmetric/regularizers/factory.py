"""One regularizer by name, from a store: what a trainer config needs.

    reg = regularizer_from_store(open_store("metric.zarr"), "sinkhorn", eps=0.05, support=64)

Every regularizer here keeps the :class:`~._penalty.Penalty` contract: the call
``reg(logits [..., V], ref, fingerprint=None) → [...]``, a ``vocab_size`` and a
``fingerprint`` (the tokenizer's, or None when the penalty does not depend on one).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ._penalty import Penalty
from .registry import PENALTY_CLASSES, penalty_class


def regularizer_from_store(store: Any, name: str, *, metric: str | None = None, **kw: Any) -> Penalty:
    """Build penalty ``name`` (one of :data:`~.registry.PENALTIES`) from a store.

    ``metric`` picks the ground cost of a penalty that takes one (Sinkhorn: default
    ``"knn"``; any metric the store has but ``tree``); the keyword arguments go to the
    penalty's constructor (e.g. ``eps``, ``support`` for Sinkhorn, ``n_projections`` for
    Sliced). Unknown names and keywords are a :class:`ConfigError`.
    """
    cls = penalty_class(name)
    if metric is not None:
        if not cls.takes_metric:
            takers = ", ".join(repr(n) for n, c in PENALTY_CLASSES.items() if c.takes_metric)
            raise ConfigError(f"penalty {name!r} takes no metric (got metric={metric!r}); only {takers} do")
        kw["metric"] = metric
    try:
        return cls.from_store(store, **kw)
    except TypeError as exc:  # an unknown keyword: name the penalty and the keyword
        raise ConfigError(f"penalty {name!r}: {exc}") from exc

