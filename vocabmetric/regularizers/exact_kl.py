"""The exact KL over the whole vocabulary: :func:`full_kl` and its penalty :class:`FullKL`.

Per position, from logits, chunked so that no extra ``[N, V]`` tensor is ever held; the
backward pass recomputes each chunk's log-softmaxes from the inputs (see :func:`full_kl`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..errors import ConfigError, VocabMetricError
from ._inputs import check_floating, check_same_device, chunk_rows, compute_dtype, raise_bad_logits
from ._penalty import Penalty

DIRECTIONS = ("reverse", "forward")


def full_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    direction: str = "reverse",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Exact KL between the policy and the reference over the whole vocabulary.

    With :math:`π = \mathrm{softmax}(z)` (``logits``) and :math:`ρ = \mathrm{softmax}(r)`
    (``ref_logits``), per position:

    * ``"reverse"``: :math:`KL(π‖ρ) = \sum_x π(x)(\log π(x) - \log ρ(x))`, gradient
      :math:`∂/∂z = π ⊙ (\log π - \log ρ - KL)`;
    * ``"forward"``: :math:`KL(ρ‖π) = \sum_x ρ(x)(\log ρ(x) - \log π(x))`, gradient
      :math:`∂/∂z = π - ρ`.

    Gradients flow to ``logits`` only. Positions are processed in chunks; only the KL
    per position is saved, and the backward pass recomputes both log-softmaxes per chunk
    from the inputs, so the memory beyond the inputs, the output and the gradient is a
    few chunk-sized float32 temporaries, O(chunk_size·V) — never an extra O(N·V) tensor
    (the plain two-``log_softmax`` expression holds about five). Time O(N·V): two fused
    ``log_softmax`` kernels and four elementwise passes per chunk, forward and backward
    alike (``benchmarks/full_kl.py`` measures both against the plain expression).

    Exact zeros: a ``-inf`` logit is a zero probability and :math:`0 \log 0 = 0`. Where
    the measuring distribution has mass the other lacks (reverse: π > 0 = ρ; forward:
    ρ > 0 = π) the KL is +inf and so is the value returned — not clamped, not hidden.
    The gradient of such a reverse-KL position is 0 (its formula would be NaN), so an
    inf position that the caller masks away (e.g. with :func:`aggregate`) does not
    poison the others; the forward gradient π − ρ is finite everywhere. Probabilities
    that underflow the compute dtype count as zeros.

    Parameters
    ----------
    logits : Tensor, shape (..., V)
        Policy logits, with grad; fp32, fp64, bf16 or fp16 (the last two computed in fp32).
    ref_logits : Tensor, shape (..., V)
        Reference logits, same shape; never differentiated.
    direction : {"reverse", "forward"}
    chunk_size : int, optional
        Positions per chunk; default ≈ 2**22 / V elements (~16 MiB of fp32 per temporary).

    Returns
    -------
    Tensor, shape (...)
        KL per position, float32 (float64 for float64 inputs).

    Raises
    ------
    VocabMetricError
        Shapes differ (both named); NaN, +inf or a row of only -inf in an input (named).
    ConfigError
        Unknown ``direction`` or a non-positive ``chunk_size``.
    """
    where = "full_kl"
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}: unknown direction {direction!r}; choose one of {DIRECTIONS}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(ref_logits, torch.Tensor):
        raise VocabMetricError(
            f"{where}: ref_logits must be the reference logits [..., V], got {type(ref_logits).__name__}; "
            "a top-k pair (ids, logprobs) does not determine the exact KL (use a Wasserstein penalty, "
            "which takes one, or pass the reference's logits)"
        )
    check_same_device(ref_logits, logits, where)
    if logits.shape != ref_logits.shape or logits.dim() == 0:
        raise VocabMetricError(
            f"{where}: logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} "
            "must have the same shape [..., V]"
        )
    check_floating(logits, where)
    check_floating(ref_logits, where)
    vocab_size = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab_size)
    ref_flat = ref_logits.detach().reshape(-1, vocab_size)
    rows = chunk_rows(vocab_size, flat.device, chunk_size)
    kl = _ClosedFormKL.apply(flat, ref_flat, direction == "reverse", rows)
    if torch.isnan(kl).any():
        raise_bad_logits([(flat, "logits"), (ref_flat, "ref_logits")], where, "KL")
    return kl.reshape(lead)


class _ClosedFormKL(torch.autograd.Function):
    """Chunked KL whose backward recomputes each chunk's log-softmaxes from the inputs.

    Only the KL per position is saved besides the inputs. Each chunk costs two fused
    ``log_softmax`` kernels and a few elementwise passes, forward and backward alike; the
    zero-probability mask is applied only to chunks that hold a zero (rare: -inf logits
    or underflow), found by a read-only ``amin`` — on CPU; on an accelerator the mask is
    always applied, as a host sync per chunk would cost more than the mask.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, reverse, rows):
        dtype = compute_dtype(logits.dtype, ref_logits.dtype)
        kl = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part = slice(start, start + rows)
            logp = torch.log_softmax(logits[part], -1, dtype=dtype)
            logq = torch.log_softmax(ref_logits[part], -1, dtype=dtype)
            a, b = (logp, logq) if reverse else (logq, logp)
            prob = a.exp()
            terms = a.sub_(b).mul_(prob)  # 0·(-inf) = NaN where prob = 0: masked next
            if _may_have_zero(prob):
                terms.masked_fill_(prob == 0, 0.0)
            torch.sum(terms, -1, out=kl[part])
        kl.clamp_(min=0)  # KL >= 0: rounding of near-equal logits may give -1e-7 (NaN and +inf stay)
        ctx.save_for_backward(logits, ref_logits, kl)
        ctx.reverse, ctx.rows = reverse, rows
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        logits, ref_logits, kl = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            logp = torch.log_softmax(logits[part], -1, dtype=kl.dtype)
            if ctx.reverse:  # π ⊙ (log π − log ρ − KL)
                prob = logp.exp()
                logq = torch.log_softmax(ref_logits[part], -1, dtype=kl.dtype)
                g = logp.sub_(logq).sub_(kl[part, None]).mul_(prob)
                if _may_have_zero(prob):
                    g.masked_fill_(prob == 0, 0.0)
                infinite = ~torch.isfinite(kl[part, None])
                if g.device.type != "cpu" or infinite.any():  # KL = +inf: constant, gradient 0
                    g.masked_fill_(infinite, 0.0)
            else:  # π − ρ
                g = logp.exp_().sub_(torch.softmax(ref_logits[part], -1, dtype=kl.dtype))
            upstream = grad_kl[part, None].to(g.dtype)
            if grad.dtype == g.dtype:
                torch.mul(g, upstream, out=grad[part])
            else:
                grad[part] = g.mul_(upstream)
        return grad, None, None, None


def _may_have_zero(prob: torch.Tensor) -> bool:
    """Whether a chunk of probabilities may hold an exact zero (NaN compares False).

    Exact on CPU; True on accelerators, where asking would synchronize with the host.
    """
    return prob.device.type != "cpu" or bool(prob.amin() == 0)


class FullKL(Penalty):
    """:func:`full_kl` as a penalty, so that the exact KL is one more choice beside the
    Wasserstein ones (any width; no fingerprint; the reference must be logits)."""

    name = "full_kl"
    needs_store = False

    def __init__(self, direction: str = "reverse", chunk_size: int | None = None):
        super().__init__()
        self.check_choice("direction", direction, DIRECTIONS)
        self._configure(chunk_size=chunk_size)
        self.direction = direction

    @classmethod
    def from_store(cls, store: Any, **kw: Any) -> "FullKL":
        """The exact KL needs no store: ``store`` is ignored (it may be None)."""
        return cls(**kw)

    def forward(self, logits: torch.Tensor, ref: torch.Tensor, *, fingerprint: str | None = None) -> torch.Tensor:
        if not isinstance(ref, torch.Tensor):
            raise VocabMetricError("FullKL: the reference must be logits [..., V], not a top-k pair")
        return full_kl(logits, ref, direction=self.direction, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}"
