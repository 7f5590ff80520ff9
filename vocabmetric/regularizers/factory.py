"""One regularizer by name, from a store: what a trainer config needs.

    reg = regularizer_from_store(open_store("metric.zarr"), "sinkhorn", eps=0.05, support=64)

Every regularizer here has the same call, ``reg(logits [..., V], ref_logits [..., V],
fingerprint=None) → [...]``, a ``vocab_size`` and a ``fingerprint`` (the tokenizer's, or
None when the penalty does not depend on one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, VocabMetricError
from .kl import DIRECTIONS, full_kl
from .sinkhorn import SinkhornDivergence
from .sliced import SlicedWasserstein
from .tree import TreeWasserstein

class FullKL(nn.Module):
    """:func:`~vocabmetric.regularizers.full_kl` as a module, so that the exact KL is one
    more penalty beside the Wasserstein ones (any width; no fingerprint)."""

    vocab_size = None
    fingerprint = None

    def __init__(self, direction: str = "reverse", chunk_size: int | None = None):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ConfigError(f"FullKL: unknown direction {direction!r}; choose one of {DIRECTIONS}")
        self.direction, self.chunk_size = direction, chunk_size

    def forward(self, logits: torch.Tensor, ref: torch.Tensor, *, fingerprint: str | None = None) -> torch.Tensor:
        if not isinstance(ref, torch.Tensor):
            raise VocabMetricError("FullKL: the reference must be logits [..., V], not a top-k pair")
        return full_kl(logits, ref, direction=self.direction, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}"


#: Each penalty's name and module class.
PENALTY_CLASSES = {"sinkhorn": SinkhornDivergence, "tree": TreeWasserstein, "sliced": SlicedWasserstein,
                   "full_kl": FullKL}
PENALTIES = tuple(PENALTY_CLASSES)


def penalty_name(regularizer: nn.Module) -> str:
    """The penalty name of a regularizer module (for logs and metrics); its class name when
    it is none of :data:`PENALTIES` (a user's own module)."""
    for name, cls in PENALTY_CLASSES.items():
        if isinstance(regularizer, cls):
            return name
    return type(regularizer).__name__


def regularizer_from_store(store: Any, name: str, *, metric: str | None = None, **kw) -> nn.Module:
    """Build penalty ``name`` ∈ {sinkhorn, tree, sliced, full_kl} from a store.

    ``metric`` picks Sinkhorn's ground cost (default ``"knn"``; any metric the store has
    but ``tree``); the keyword arguments go to the regularizer's constructor (e.g.
    ``eps``, ``support`` for Sinkhorn, ``n_projections`` for Sliced).
    """
    if name not in PENALTIES:
        raise ConfigError(f"unknown penalty {name!r}; choose one of {PENALTIES}")
    if metric is not None and name != "sinkhorn":
        raise ConfigError(f"penalty {name!r} takes no metric (got metric={metric!r}); only 'sinkhorn' does")
    try:
        if name == "sinkhorn":
            return SinkhornDivergence.from_store(store, metric or "knn", **kw)
        if name == "tree":
            return TreeWasserstein.from_store(store, **kw)
        if name == "sliced":
            return SlicedWasserstein.from_store(store, **kw)
        return FullKL(**kw)
    except TypeError as exc:  # an unknown keyword: name the penalty and the keyword
        raise ConfigError(f"penalty {name!r}: {exc}") from exc
