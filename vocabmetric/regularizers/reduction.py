"""The reduction every penalty's per-position values go through: :func:`aggregate`."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._inputs import check_same_shape

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    r"""Reduce per-token values ``[..., T]`` to a scalar loss, as trainers do.

    * ``"token-mean"``: :math:`\sum_{b,t} m\,v / \sum_{b,t} m` — every token weighs the same.
    * ``"seq-mean-token-mean"``: mean over sequences of :math:`\sum_t m\,v / \sum_t m`.
    * ``"seq-mean-token-sum"``: mean over sequences of :math:`\sum_t m\,v`.

    Sequences (all leading dims flattened) with no token in ``mask`` are left out of the
    sequence means; an empty mask gives 0 (still connected to the graph). Masked positions
    may hold inf or NaN: they are selected away, not multiplied by 0, so they reach
    neither the value nor the gradient.

    Parameters
    ----------
    values : Tensor, shape (..., T)
    mask : Tensor, shape (..., T), bool or {0, 1}
    mode : {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"}

    Returns
    -------
    Tensor, shape ()
    """
    where = "aggregate"
    if mode not in AGGREGATIONS:
        raise ConfigError(f"{where}: unknown mode {mode!r}; choose one of {AGGREGATIONS}")
    check_same_shape(where, values=values, mask=mask)
    keep = mask != 0
    masked = torch.where(keep, values, 0.0)
    if mode == "token-mean":
        return masked.sum() / keep.sum().clamp_min(1)
    n_tokens = keep.sum(-1).reshape(-1)
    per_seq = masked.sum(-1).reshape(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / n_tokens.clamp_min(1)
    return per_seq.sum() / (n_tokens > 0).sum().clamp_min(1)
