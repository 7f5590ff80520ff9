"""Log-space arithmetic shared by the Sinkhorn kernels and solver: stable ``log(1 − e^{−x})``
and ``logsumexp``, the exponent range in which a linear-domain sum is exact, log-probabilities
with exact zeros, the L1 marginal error of a plan, and a small per-ε cache."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

LOG = logging.getLogger(__name__)

NEG_INF = float("-inf")
#: exp(−80) ≈ 1.8e-35 is a normal float32, so exp never underflows after the clamp.
FLOOR = -80.0
#: The exponent floor and accepted range of a linear-domain sum per compute dtype (the fused
#: sparse kernel's and the dense support kernel's): e^floor is a normal number, and
#: deg·e^floor (deg ≤ 1e4) is below half an ulp of any sum above e^accept.
LINEAR_RANGE = {torch.float32: (-80.0, -57.0), torch.float64: (-700.0, -655.0)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(−x))`` for ``x ≥ 0``, accurate at both ends (Mächler 2012); −inf at 0."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


def lse_(block: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension, overwriting ``block`` (no second temporary).

    Terms more than ``FLOOR`` below the row's largest are raised to it before ``exp``:
    they weigh < 1e-30 relative (float32 keeps 1e-7) and exp of an input that underflows
    (or of −inf) takes a slow scalar path in torch's CPU kernels, ~20× slower. A row of
    only −inf stays −inf.
    """
    top = block.amax(-1)
    finite = torch.isfinite(top)
    top = torch.where(finite, top, 0.0)
    block -= top[..., None]
    block.clamp_(min=FLOOR).exp_()
    lse = block.sum(-1).log_().add_(top)
    return torch.where(finite, lse, NEG_INF)


def log_probs(p: torch.Tensor) -> torch.Tensor:
    """``log p``, exactly −inf where ``p = 0`` (and finite for the smallest positive p)."""
    return torch.where(p > 0, p.clamp_min(torch.finfo(p.dtype).tiny).log(), NEG_INF)


def marginal_error(mass: torch.Tensor, old: torch.Tensor, new: torch.Tensor, eps: float,
                   tokens: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position L1 marginal error ``Σ_j m_j |exp((old_j − new_j)/ε) − 1|`` (j along
    the ``tokens`` axis).

    For the plan built from ``old`` and the other side's fresh potential, this is
    ``‖P^T 1 − m‖₁``: ``new`` is what ``old`` would have to become to fit ``m`` exactly.
    (Potentials are always finite; the clamp keeps exp on its fast path. ``exp − 1``, not
    ``expm1``: half the time on CPU, and its rounding, an ulp of 1 per token — 6e-8 in
    float32 — is far below any tolerance float32 can meet.) ``out``: scratch of old's shape
    for the ratio.
    """
    ratio = torch.sub(old, new, out=out).div_(eps).clamp_(FLOOR, 50.0).exp_().sub_(1.0).abs_()
    return ratio.mul_(mass).sum(tokens)


def per_eps(cache: dict, eps: float, make: Callable) -> Any:
    """``cache[eps]``, made by ``make()`` on first use; ε schedules are short, and the oldest
    entry goes beyond 64 to keep memory bounded anyway."""
    if eps not in cache:
        cache[eps] = make()
        if len(cache) > 64:
            cache.pop(next(iter(cache)))
    return cache[eps]
