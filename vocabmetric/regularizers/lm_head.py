"""A penalty straight from the hidden states and the LM head: :func:`lm_head_penalty`.

What Liger's fused linear cross-entropy does for the cross-entropy, for every penalty: the
``(N, V)`` float32 logits ``z = h Wᵀ + b`` are never held. Positions are taken a chunk at a
time; for each chunk the logits, the penalty and its gradient ``g = ∂L/∂z`` are computed at
once, and ``g`` is folded back through the head (``∂L/∂h = g W``, ``∂L/∂W += gᵀ h``,
``∂L/∂b += Σ g``) before the next chunk. The gradients are therefore computed in the
forward pass and kept for backward, which only scales them: ``loss.backward()`` works as
usual, and the memory is O(chunk·V + V·d) instead of O(N·V).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from ..errors import ConfigError, VocabMetricError
from ._chunks import _graph_kept
from ._inputs import Reference, chunk_rows, compute_dtype
from ._penalty import Penalty
from .reduction import aggregate

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

#: Fewest positions per chunk by default. Each chunk reads and writes the whole ``∂L/∂W``
#: (V·d) for a rank-``chunk`` update: 512 rows give it ≥ 128 flops per byte moved, a
#: matrix product rather than a memory sweep (85-row chunks, ``2**22 / V`` at V = 49,152,
#: measured 1.2–1.5× slower on CPU); a (512, V) float32 temporary is 311 MB at V = 151,936.
MIN_ROWS = 512


def lm_head_penalty(
    penalty: Callable,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref: Reference | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "token-mean",
    logits_fn: LogitsFn | None = None,
    chunk_size: int | None = None,
    fingerprint: str | None = None,
) -> torch.Tensor:
    r"""The reduced penalty :math:`L = \mathrm{aggregate}(D(hWᵀ + b, ρ), m)`, chunk by chunk.

    Equal (to rounding) to ``aggregate(penalty(hidden @ weight.T + bias, ref), mask, reduction)``
    and its gradients with respect to ``hidden``, ``weight`` and ``bias``, without ever
    holding the ``(N, V)`` logits. :func:`~vocabmetric.regularizers.aggregate` is linear in
    the per-position values, :math:`L = \sum_i w_i D_i` with weights :math:`w = ∂L/∂D` that
    depend on the mask only (they are taken from ``aggregate`` itself), so for each chunk C of
    kept positions, in float32 (float64 when ``hidden`` or ``weight`` is):

    .. math::

        z_C = h_C Wᵀ + b,\quad g_C = ∂\Big(\sum_{i∈C} w_i D(z_i, ρ_i)\Big)/∂z_C,\quad
        ∂L/∂h_C = g_C W,\quad ∂L/∂W \mathrel{+}= g_Cᵀ h_C,\quad ∂L/∂b \mathrel{+}= \textstyle\sum_i g_i.

    ``g_C`` comes from the penalty's own backward (autograd on the chunk). Positions the mask
    drops are never computed. As in Liger's fused linear cross-entropy, the gradients are
    computed in the forward pass and saved; backward only scales them by the upstream
    gradient (``once_differentiable``: no double backward).

    Parameters
    ----------
    penalty : callable
        ``penalty(logits [n, V], ref [n, ...]) → [n]``: :func:`full_kl`, or any
        :class:`Penalty` (``TreeWasserstein``, ``SinkhornDivergence``, …; called with
        ``fingerprint=``).
    hidden : Tensor, shape (..., d)
        The policy's last hidden states (after the final norm), any float dtype, with grad.
    weight : Tensor, shape (V, d)
        The LM head (``model.lm_head.weight``; ``weight[:V]`` for a head padded past the
        penalty's vocabulary), on ``hidden``'s device; gets its gradient if it requires one.
    ref : Tensor (..., V) or (ids (..., m), logprobs (..., m)), optional
        The reference as logits or as a top-k pair (never differentiated); or None and
        ``ref_hidden`` with ``ref_weight``.
    bias : Tensor, shape (V,), optional
    ref_hidden, ref_weight, ref_bias : Tensor, shapes (..., d'), (V, d'), (V,), optional
        The reference model's hidden states and head: its logits are made chunk by chunk
        too (without grad), so neither side ever holds ``(N, V)``.
    mask : Tensor, shape (...), bool or {0, 1}, optional
        The positions that count (default: all), as for ``aggregate``.
    reduction : {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"}
        ``aggregate``'s mode; the last leading dim of ``hidden`` is the sequence.
    logits_fn : callable, optional
        Applied to each chunk's logits, policy and reference-from-hidden alike, before the
        penalty: a model's logit scale, soft cap or sampling temperature (differentiable
        torch ops acting per position, e.g. ``lambda z: 30 * torch.tanh(z / 30)``). Logits
        passed as ``ref`` are taken as they are.
    chunk_size : int, optional
        Positions per chunk; default ``max(512, 2**22 / V)`` on CPU (``2**26 / V`` on a GPU;
        :data:`MIN_ROWS`).
    fingerprint : str, optional
        The tokenizer's, checked by a :class:`Penalty` as in its own call.

    Returns
    -------
    Tensor, shape ()
        float32 (float64 when ``hidden`` or ``weight`` is float64).

    Cost: the three matrix products of the plain path (2·N·V·d flops each) plus the
    reference's, and the penalty on N positions. Memory beyond the inputs: a few
    ``(chunk, V)`` temporaries, float32 copies of the head (V·d) and the saved gradients
    (N·d + V·d) — O(chunk·V + V·d), never O(N·V). ``SinkhornDivergence.last_info`` describes
    the last chunk only.

    Raises
    ------
    VocabMetricError
        ``hidden`` and a head on different devices, a width d that differs, no positions
        (N = 0), a reference or mask whose leading dims are not ``hidden``'s, both or
        neither of ``ref`` and ``ref_hidden``, a penalty that returns no value per position.
    ConfigError
        ``chunk_size`` < 1, an unknown ``reduction``.

    Examples
    --------
    >>> out = model.model(input_ids, attention_mask=attn)                      # doctest: +SKIP
    >>> loss = lm_head_penalty(reg, out.last_hidden_state, model.lm_head.weight,
    ...                        ref_hidden=ref_h, ref_weight=ref_model.lm_head.weight,
    ...                        mask=completion_mask)                           # doctest: +SKIP
    """
    where = "lm_head_penalty"
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}")
    check_head(hidden, weight, bias, where, "")
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    flat = hidden.reshape(-1, width)
    n_positions, vocab_size = flat.shape[0], weight.shape[0]
    if n_positions == 0:
        raise VocabMetricError(f"{where}: hidden {tuple(hidden.shape)} has no positions; pass at least one "
                               "(an empty batch has no penalty to compute)")
    if mask is None:
        keep = torch.ones(lead, dtype=torch.bool, device=flat.device)
    else:
        keep = _check_mask(mask, lead, flat.device, where)
    weights = position_weights(keep, reduction)
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    reference = _reference_rows(ref, ref_hidden, ref_weight, ref_bias, lead, vocab_size, flat.device, dtype,
                                logits_fn, where)
    rows = chunk_size or max(chunk_rows(vocab_size, flat.device), MIN_ROWS)
    kept = None if mask is None else keep.reshape(-1).nonzero().squeeze(1)
    wants = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    want_grad = torch.is_grad_enabled() and any(wants)

    def run() -> tuple[torch.Tensor, list]:
        head = weight.detach().to(dtype)
        head_bias = None if bias is None else bias.detach().to(dtype)
        grads = [torch.zeros_like(flat) if wants[0] else None,
                 torch.zeros((vocab_size, width), dtype=dtype, device=flat.device) if wants[1] else None,
                 torch.zeros(vocab_size, dtype=dtype, device=flat.device) if wants[2] else None]
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        n_kept = n_positions if kept is None else kept.numel()
        for start in range(0, n_kept, rows):
            index = slice(start, start + rows) if kept is None else kept[start : start + rows]
            states = flat[index].detach().to(dtype)
            logits = _project(states, head, head_bias)
            part, dz = _chunk_penalty(penalty, logits, reference(index), weights[index].to(dtype), logits_fn,
                                      fingerprint, want_grad, where)
            total += part
            if dz is None:
                continue
            if grads[0] is not None:
                grads[0][index] = (dz @ head).to(flat.dtype)
            if grads[1] is not None:
                grads[1].addmm_(dz.T, states)
            if grads[2] is not None:
                grads[2] += dz.sum(0)
        if grads[0] is not None:
            grads[0] = grads[0].reshape(hidden.shape)
        if grads[1] is not None:
            grads[1] = grads[1].to(weight.dtype)
        if grads[2] is not None:
            grads[2] = grads[2].to(bias.dtype)
        return total.to(dtype), grads

    if not want_grad:
        return run()[0]
    return _SavedHeadGradients.apply(hidden, weight, bias, run)


def position_weights(keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """``w = ∂ aggregate(D, keep, reduction) / ∂D``, flattened ``(N,)`` float64: the reduction
    is linear in the values, so ``aggregate(D) = Σ w·D`` (0 where ``keep`` is False). O(N)."""
    values = torch.zeros(keep.shape, dtype=torch.float64, device=keep.device, requires_grad=True)
    with torch.enable_grad():
        (weights,) = torch.autograd.grad(aggregate(values, keep, reduction), values)
    return weights.reshape(-1)


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, where: str, side: str) -> None:
    """Raise unless ``hidden (..., d)`` and ``weight (V, d)`` (and ``bias (V,)``) are floats
    on one device with one width d. ``side`` prefixes the names (``"ref_"``)."""
    names = f"{side}hidden", f"{side}weight", f"{side}bias"
    for tensor, name in ((hidden, names[0]), (weight, names[1]), (bias, names[2])):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            shown = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise VocabMetricError(f"{where}: {name} must be a floating-point tensor, got {shown}")
        if tensor.device != hidden.device:
            raise VocabMetricError(f"{where}: {name} is on {tensor.device}, {names[0]} on {hidden.device}; "
                                   f"move them to one device ({name}.to({names[0]}.device))")
    if hidden.dim() == 0 or weight.dim() != 2:
        raise VocabMetricError(f"{where}: {names[0]} must be (..., d) and {names[1]} (V, d), got "
                               f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise VocabMetricError(f"{where}: {names[0]} has width d = {hidden.shape[-1]} but {names[1]} "
                               f"{tuple(weight.shape)} takes d = {weight.shape[1]}; pass the head of the model "
                               "that made the hidden states")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise VocabMetricError(f"{where}: {names[2]} {tuple(bias.shape)} must be ({weight.shape[0]},), one per row "
                               f"of {names[1]}")


def _check_mask(mask: torch.Tensor, lead: torch.Size, device: torch.device, where: str) -> torch.Tensor:
    """``mask != 0``, once it is a tensor of hidden's leading dims on hidden's device."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(lead) or mask.device != device:
        shown = (tuple(mask.shape), str(mask.device)) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise VocabMetricError(f"{where}: mask {shown} must be a tensor of hidden's leading dims {tuple(lead)} "
                               f"on {device}")
    return mask != 0


def _project(states: torch.Tensor, head: torch.Tensor, head_bias: torch.Tensor | None) -> torch.Tensor:
    """``states @ headᵀ + bias``, ``(n, V)``, no grad."""
    if head_bias is None:
        return states @ head.T
    return torch.addmm(head_bias, states, head.T)


def _chunk_penalty(penalty, logits, ref, weights, logits_fn, fingerprint, want_grad, where):
    """``Σ w·D`` over one chunk (a 0-dim float64) and, when ``want_grad``, ``∂/∂logits``."""
    with torch.enable_grad() if want_grad else torch.no_grad():
        if want_grad:
            logits.requires_grad_()
        shown = logits if logits_fn is None else logits_fn(logits)
        values = penalty(shown, ref, fingerprint=fingerprint) if isinstance(penalty, Penalty) else penalty(shown, ref)
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (logits.shape[0],):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise VocabMetricError(f"{where}: the penalty must return one value per position, ({logits.shape[0]},) "
                                   f"for these logits, got {shape}; pass a per-position penalty (not a reduced loss)")
        part = (values.to(weights.dtype) * weights).sum()
        if not want_grad:
            return part.double(), None
        (dz,) = torch.autograd.grad(part, logits)
    return part.detach().double(), dz


def _reference_rows(ref, ref_hidden, ref_weight, ref_bias, lead, vocab_size, device, dtype, logits_fn, where):
    """A function ``index → the reference of those flattened positions``: rows of the given
    logits or top-k pair, or logits made from the reference hidden states (no grad)."""
    if (ref is None) == (ref_hidden is None):
        raise VocabMetricError(f"{where}: pass the reference either as ref= (logits or a top-k pair) or as "
                               "ref_hidden= with ref_weight=, not " + ("both" if ref is not None else "neither"))
    if ref_hidden is not None:
        if ref_weight is None:
            raise VocabMetricError(f"{where}: ref_hidden needs ref_weight, the reference model's LM head (V, d)")
        check_head(ref_hidden, ref_weight, ref_bias, where, "ref_")
        if ref_hidden.device != device or tuple(ref_hidden.shape[:-1]) != tuple(lead):
            raise VocabMetricError(f"{where}: ref_hidden {tuple(ref_hidden.shape)} on {ref_hidden.device} must have "
                                   f"hidden's leading dims {tuple(lead)} and device {device}")
        if ref_weight.shape[0] != vocab_size:
            raise VocabMetricError(f"{where}: ref_weight has {ref_weight.shape[0]} rows, weight {vocab_size}; "
                                   "cut both heads to the penalty's vocabulary")
        flat = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
        head = ref_weight.detach().to(dtype)
        head_bias = None if ref_bias is None else ref_bias.detach().to(dtype)

        def from_hidden(index):
            with torch.no_grad():
                logits = _project(flat[index].to(dtype), head, head_bias)
                return logits if logits_fn is None else logits_fn(logits)

        return from_hidden
    if isinstance(ref, torch.Tensor):
        if ref.device != device or tuple(ref.shape) != (*lead, vocab_size):
            raise VocabMetricError(f"{where}: reference logits {tuple(ref.shape)} on {ref.device} must be "
                                   f"{(*lead, vocab_size)} on {device}")
        flat = ref.detach().reshape(-1, vocab_size)
        return lambda index: flat[index]
    if isinstance(ref, (tuple, list)) and len(ref) == 2 and all(isinstance(t, torch.Tensor) for t in ref):
        ids, logprobs = ref
        if tuple(ids.shape[:-1]) != tuple(lead) or ids.shape != logprobs.shape or ids.device != device:
            raise VocabMetricError(f"{where}: top-k reference ids {tuple(ids.shape)} and logprobs "
                                   f"{tuple(logprobs.shape)} must both be (..., m) with hidden's leading dims "
                                   f"{tuple(lead)}, on {device}")
        ids, logprobs = ids.reshape(-1, ids.shape[-1]), logprobs.detach().reshape(-1, ids.shape[-1])
        return lambda index: (ids[index], logprobs[index])
    raise VocabMetricError(f"{where}: ref must be reference logits (..., V) or a pair of tensors (ids, logprobs), "
                           f"got {type(ref).__name__}")


class _SavedHeadGradients(torch.autograd.Function):
    """Forward runs the chunks and saves the gradients they gave; backward scales them.

    In place when the graph is not kept (autograd frees them next anyway), as
    :class:`~._chunks.ClosedFormFunction` does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        loss, grads = run()
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        in_place = not _graph_kept()
        scaled = []
        for grad in ctx.saved_tensors:
            if grad is None:
                scaled.append(None)
                continue
            scale = grad_loss.to(grad.dtype)
            scaled.append(grad.mul_(scale) if in_place else grad * scale)
        return (*scaled, None)
