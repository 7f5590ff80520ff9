"""Input checks and reference handling shared by every regularizer.

A regularizer takes policy logits ``[..., V]`` (with grad) and a reference given either
as logits ``[..., V]`` (no grad) or as a top-k pair ``(ids [..., m], logprobs [..., m])``,
as RL pipelines often keep only a few reference log-probabilities per position.
"""

from __future__ import annotations

from typing import Union

import torch

from ..errors import VocabMetricError
from ..cost import check_vocab_size

Reference = Union[torch.Tensor, tuple]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16 and fp16 are computed in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Raise if ``tensor`` holds a NaN (±inf logits are allowed: they are exact zeros)."""
    if torch.isnan(tensor).any():
        raise VocabMetricError(
            f"{where}: {name} contains NaN (shape {tuple(tensor.shape)}); the model produced "
            "NaN logits upstream — the penalty refuses to hide them in a NaN loss"
        )


def check_logprobs(tensor: torch.Tensor, name: str, where: str) -> None:
    """Raise if log-probabilities hold a NaN or a +inf (-inf is an exact zero)."""
    check_finite(tensor, name, where)
    if torch.isposinf(tensor).any():
        raise VocabMetricError(f"{where}: {name} contains +inf; log-probabilities are <= 0, or -inf for a zero")


def check_floating(logits: torch.Tensor, where: str) -> None:
    """Raise unless ``logits`` is a floating-point tensor (integer logits have no softmax)."""
    if not logits.is_floating_point():
        raise VocabMetricError(f"{where}: logits must be a floating-point tensor, got {logits.dtype}; "
                               "pass the model's logits (float32, bfloat16, ...)")


def raise_bad_logits(named: list[tuple[torch.Tensor, str]], where: str, what: str = "value") -> None:
    """Name the input that made a result NaN (call it once a NaN was found, so valid inputs
    pay no extra pass): a NaN, a +inf, or a row of only -inf (no distribution)."""
    for tensor, name in named:
        check_finite(tensor, name, where)
        if torch.isposinf(tensor).any():
            raise VocabMetricError(f"{where}: {name} contains +inf; logits must be finite or -inf")
        empty = torch.isneginf(tensor).all(-1)
        if empty.any():
            row = int(empty.nonzero()[0, 0])
            raise VocabMetricError(f"{where}: {name} row {row} (flattened) is all -inf: no distribution to compare")
    raise VocabMetricError(f"{where}: the {what} came out NaN for valid inputs; please report it")


def check_width(vocab_size: int, logits: torch.Tensor, where: str) -> None:
    """Raise :class:`FingerprintMismatch` if the logits width is not the operator's V."""
    check_vocab_size(vocab_size, logits.shape[-1], where)


def check_same_device(ref: torch.Tensor, logits: torch.Tensor, where: str) -> None:
    """Raise unless the reference logits are on the policy logits' device (``meta`` included:
    a meta tensor holds no values, and a penalty of one would be a made-up number)."""
    if ref.device != logits.device or logits.device.type == "meta":
        raise VocabMetricError(
            f"{where}: reference logits are on {ref.device}, policy logits on {logits.device}; "
            "both must hold values on one device: move the reference to the policy's "
            "(ref.to(logits.device)), and materialize meta tensors (e.g. load the model's weights) first"
        )


def check_reference_shape(ref: Reference, logits: torch.Tensor, where: str) -> None:
    """Raise unless reference logits have the policy logits' shape, or a top-k pair
    ``(ids, logprobs)`` (tensors) has two ``[..., m]`` parts with the logits' leading dims."""
    if isinstance(ref, torch.Tensor):
        check_same_device(ref, logits, where)
        if ref.shape != logits.shape:
            raise VocabMetricError(
                f"{where}: reference logits {tuple(ref.shape)} and policy logits "
                f"{tuple(logits.shape)} must have the same shape"
            )
        return
    ids, logprobs = ref
    if ids.shape != logprobs.shape or ids.shape[:-1] != logits.shape[:-1]:
        raise VocabMetricError(
            f"{where}: top-k reference ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} "
            f"must both be [..., m] with leading dims {tuple(logits.shape[:-1])}"
        )
    if ids.dim() == 0 or ids.shape[-1] == 0:
        raise VocabMetricError(f"{where}: the top-k reference has m = 0 entries per position; pass m >= 1 "
                               "(ids, logprobs), or the reference logits")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise VocabMetricError(f"{where}: top-k reference ids must be integers, got {ids.dtype}")


def reference_probs(ref: Reference, logits: torch.Tensor, where: str) -> torch.Tensor:
    """The reference distribution ``q [..., V]`` without grad, in float64 for float64
    logits and float32 otherwise.

    * logits ``[..., V]``: ``softmax(ref)``.
    * ``(ids [..., m], logprobs [..., m])``: ``q[ids] = exp(logprobs)``, and the mass left
      over, ``1 - Σ exp(logprobs)``, is spread evenly over the other V − m tokens (the
      reference says nothing about them).
    """
    V = logits.shape[-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if isinstance(ref, torch.Tensor):
        check_reference_shape(ref, logits, where)
        check_finite(ref, "reference logits", where)
        return torch.softmax(ref.detach().to(dtype), dim=-1)
    if not (isinstance(ref, (tuple, list)) and len(ref) == 2):
        raise VocabMetricError(
            f"{where}: reference must be logits [..., V] or a pair (ids [..., m], logprobs [..., m]), "
            f"got {type(ref).__name__}"
        )
    ids, logprobs = ref
    ids = torch.as_tensor(ids, device=logits.device).long()
    logprobs = torch.as_tensor(logprobs, device=logits.device).detach().to(dtype)
    check_reference_shape((ids, logprobs), logits, where)
    check_logprobs(logprobs, "reference logprobs", where)
    check_topk_ids(ids, V, where)
    top = logprobs.exp()
    total = top.sum(-1, keepdim=True)
    if (total > 1 + 1e-3).any():
        raise VocabMetricError(
            f"{where}: top-k reference probabilities sum to {total.max().item():.4f} > 1; pass "
            "log-probabilities of a normalized distribution"
        )
    m = ids.shape[-1]
    rest = (1 - total).clamp_min(0) / max(V - m, 1)
    q = rest.expand(*logits.shape[:-1], V).clone()
    q.scatter_(-1, ids, top)
    return q / q.sum(-1, keepdim=True)


def check_topk_ids(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """Raise unless every position's top-k ids lie in ``[0, V)`` and are distinct (a repeated
    id would count its probability twice). O(N·m log m)."""
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise VocabMetricError(f"{where}: top-k reference ids must lie in [0, {vocab_size})")
    flat = ids.reshape(-1, ids.shape[-1])
    ordered = flat.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    if repeated.any():
        row = int(repeated.nonzero()[0, 0])
        twice = ordered[row, 1:][ordered[row, 1:] == ordered[row, :-1]]
        raise VocabMetricError(
            f"{where}: top-k reference row {row} (flattened) lists token id {int(twice[0])} more than once; "
            "each position's ids must be distinct (merge the duplicates' probabilities)"
        )


#: Elements per chunk of positions for the closed-form regularizers and full_kl: a few
#: float32 temporaries of this size (16 MiB each on CPU) stay small beside N·V inputs yet
#: amortize the per-chunk overhead. A GPU gets 16× more (256 MiB): there every op of a
#: small chunk is launch-bound.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def chunk_rows(vocab_size: int, device: torch.device, chunk_size: int | None = None) -> int:
    """Positions per chunk: ``chunk_size`` if given, else ``CHUNK_ELEMENTS[device] // V``."""
    return chunk_size or max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"]) // max(vocab_size, 1))


def check_same_shape(where: str, **tensors: torch.Tensor | None) -> None:
    """Raise unless every given tensor (None skipped) has one shape: one value per token."""
    given = {name: t for name, t in tensors.items() if t is not None}
    shapes = {tuple(t.shape) for t in given.values()}
    if len(shapes) > 1:
        listed = ", ".join(f"{name} {tuple(t.shape)}" for name, t in given.items())
        raise VocabMetricError(f"{where}: shapes differ: {listed}; pass one value per token")
