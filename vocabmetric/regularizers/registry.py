"""Every penalty by name: the one table that the factory, the TRL and verl adapters and
config validation read. A new penalty is one module (a :class:`~._penalty.Penalty` with a
``name``) plus one entry in :data:`PENALTY_CLASSES`."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ._penalty import Penalty
from .exact_kl import FullKL
from .sinkhorn import SinkhornDivergence
from .sliced import SlicedWasserstein
from .tree import TreeWasserstein

#: Each penalty's name and class.
PENALTY_CLASSES: dict[str, type[Penalty]] = {
    cls.name: cls for cls in (SinkhornDivergence, TreeWasserstein, SlicedWasserstein, FullKL)
}
PENALTIES = tuple(PENALTY_CLASSES)


def penalty_class(name: str, *, where: str = "penalty") -> type[Penalty]:
    """The class of penalty ``name``; a :class:`ConfigError` listing the names otherwise."""
    try:
        return PENALTY_CLASSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: unknown penalty {name!r}; choose one of {PENALTIES}") from None


def penalty_name(regularizer: nn.Module) -> str:
    """The penalty name of a regularizer module (for logs and metrics); its class name when
    it is none of :data:`PENALTIES` (a user's own module)."""
    return getattr(regularizer, "name", None) if isinstance(regularizer, Penalty) else type(regularizer).__name__
