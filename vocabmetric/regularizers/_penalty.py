"""The contract every penalty keeps: :class:`Penalty`.

A penalty is an ``nn.Module`` with one call::

    penalty(logits [..., V], ref, *, fingerprint=None) → [...]

``logits`` are the policy's (with grad), ``ref`` the reference as logits ``[..., V]`` or a
top-k pair ``(ids [..., m], logprobs [..., m])``; the result is one value per position,
and the caller chooses the mask and the reduction. Besides the call, a penalty has

* ``vocab_size`` — the logits width it accepts (None: any width),
* ``fingerprint`` — the tokenizer it was built for (None: it depends on none),
* ``from_store(store, **kw)`` — the way a trainer config builds it,
* ``name`` — its name in :data:`~vocabmetric.regularizers.registry.PENALTY_CLASSES`.

A bad constructor argument is a :class:`~vocabmetric.errors.ConfigError`; logits that do
not fit (width, tokenizer) a :class:`~vocabmetric.errors.FingerprintMismatch`; bad values
in the tensors (NaN, +inf) a :class:`~vocabmetric.errors.VocabMetricError`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, VocabMetricError
from ..cost import check_fingerprint
from ._inputs import check_floating, check_width

#: The backends of a penalty with a numba CPU kernel beside its torch path.
NUMBA_BACKENDS = ("auto", "numba", "torch")


class Penalty(nn.Module):
    """Base class of every penalty (see the module docstring for the contract).

    Subclasses set ``name``, implement ``forward`` and ``from_store``, and, when they have a
    compiled CPU kernel, set ``backends = NUMBA_BACKENDS`` and override :meth:`cpu_kernel`.
    """

    name: ClassVar[str]
    #: Whether ``from_store`` takes ``metric=`` (the ground cost is any stored metric).
    takes_metric: ClassVar[bool] = False
    #: Whether ``from_store`` reads the store (False: any store, or None, will do).
    needs_store: ClassVar[bool] = True
    backends: ClassVar[tuple[str, ...]] = ("auto", "torch")

    # -- construction -------------------------------------------------------------------
    def _configure(self, *, backend: str = "auto", chunk_size: int | None = None) -> None:
        """Check and keep the settings every penalty has (call from ``__init__``)."""
        self.check_choice("backend", backend, self.backends)
        self.check_positive_int("chunk_size", chunk_size, optional=True)
        self.backend, self.chunk_size = backend, chunk_size

    def config_error(self, message: str) -> ConfigError:
        """A :class:`ConfigError` prefixed with the penalty's class name."""
        return ConfigError(f"{type(self).__name__}: {message}")

    def check_choice(self, setting: str, value: Any, choices: tuple) -> None:
        if value not in choices:
            raise self.config_error(f"unknown {setting} {value!r}; choose one of {choices}")

    def check_positive_int(self, setting: str, value: Any, *, optional: bool = False) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.config_error(f"{setting} must be a positive int{' or None' if optional else ''}, got {value!r}")

    @classmethod
    def from_store(cls, store: Any, **kw: Any) -> "Penalty":  # pragma: no cover - abstract
        raise NotImplementedError

    # -- what it covers -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int | None:
        return None

    @property
    def fingerprint(self) -> str | None:
        return None

    def check_logits(self, logits: torch.Tensor, fingerprint: str | None = None) -> None:
        """Raise unless ``logits`` are ``[..., V]`` of this penalty's width and tokenizer."""
        where = type(self).__name__
        if logits.dim() == 0:
            raise VocabMetricError(f"{where}: logits must be [..., V], got a scalar")
        check_floating(logits, where)
        if self.vocab_size is not None:
            check_width(self.vocab_size, logits, where)
        check_fingerprint(self.fingerprint, fingerprint, where)

    # -- which kernel runs ----------------------------------------------------------------
    def cpu_kernel(self) -> Callable | None:
        """The compiled CPU kernel, or None when there is none (or numba is missing)."""
        return None

    def backend_for(self, device: torch.device) -> str:
        """The backend that runs for tensors on ``device``: ``"auto"`` takes numba on CPU
        when it compiles, torch otherwise; an explicit choice that cannot run raises."""
        where = type(self).__name__
        if self.backend == "auto":
            return "numba" if device.type == "cpu" and self.cpu_kernel() is not None else "torch"
        if self.backend == "numba":
            if device.type != "cpu":
                raise VocabMetricError(f"{where}: the numba backend runs on CPU tensors, got {device}; use backend='torch'")
            if self.cpu_kernel() is None:
                raise VocabMetricError(f"{where}: backend='numba' needs numba (installed with umap-learn)")
        return self.backend
