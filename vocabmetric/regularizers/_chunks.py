"""The skeleton every closed-form regularizer shares: positions in chunks, ∂/∂z saved in forward.

Tree-, Sliced-Wasserstein and the Sinkhorn divergence all compute their gradient with
their value (a subgradient in closed form, or the envelope theorem's dual potential), so
none backpropagates through its computation. :func:`solve_by_chunks` soft-maxes the
logits and the reference a chunk of positions at a time into two reused buffers, hands
each chunk to the regularizer's ``chunk(p, q, value_out, dz_out)``, and
:class:`ClosedFormFunction` keeps the (N, V) ``∂W/∂z`` for backward, which only scales it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._inputs import Reference, check_reference_shape, check_topk_ids, chunk_rows, raise_bad_logits, reference_probs


def solve_by_chunks(logits: torch.Tensor, ref: Reference, chunk, *, chunk_size: int | None, dtype: torch.dtype,
                    where: str) -> torch.Tensor:
    """Per-position values ``[...]`` of a closed-form regularizer, with its gradient.

    Positions are taken ``chunk_size`` at a time (default: about 4M elements a chunk on CPU, 64M on a GPU; see
    :data:`._inputs.CHUNK_ELEMENTS`):
    ``p = softmax(logits)`` and the reference ``q``
    are written into two reused ``(chunk, V)`` buffers, and ``chunk(p, q, value_out, dz_out)``
    fills the chunk's values and (when a gradient is wanted; else ``dz_out`` is None) its
    ``∂W/∂z``, which :class:`ClosedFormFunction` saves for backward. A NaN value is traced
    back to its input by :func:`raise_bad_inputs` (no upfront pass over the logits).
    """
    vocab_size = logits.shape[-1]
    rows = chunk_rows(vocab_size, logits.device, chunk_size)
    flat_ref = flatten_reference(ref, logits, where)
    want_grad = torch.is_grad_enabled() and logits.requires_grad

    def run(flat: torch.Tensor):
        n = flat.shape[0]
        value = torch.empty(n, dtype=dtype, device=flat.device)
        dz = torch.empty((n, vocab_size), dtype=dtype, device=flat.device) if want_grad else None
        buffers = torch.empty((2, min(rows, n), vocab_size), dtype=dtype, device=flat.device)
        for lo in range(0, n, rows):
            part = slice(lo, lo + rows)
            m = flat[part].shape[0]
            p = softmax_into(flat[part], buffers[0, :m])
            q = reference_chunk(slice_reference(flat_ref, part), flat[part], buffers[1, :m], where)
            chunk(p, q, value[part], dz[part] if want_grad else None)
        return value, dz

    flat = logits.reshape(-1, vocab_size)
    value = ClosedFormFunction.apply(flat, run) if want_grad else run(flat.detach())[0]
    if torch.isnan(value).any():  # NaN inputs are found here, not by an extra pass over them
        raise_bad_inputs(flat, flat_ref, where)
    return value.reshape(logits.shape[:-1])


def flatten_reference(ref: Reference, logits: torch.Tensor, where: str) -> Reference:
    """The reference with its leading dims flattened to match ``logits.reshape(-1, V)``."""
    if isinstance(ref, torch.Tensor):
        check_reference_shape(ref, logits, where)
        return ref.detach().reshape(-1, logits.shape[-1])
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        ids, logprobs = (torch.as_tensor(t, device=logits.device) for t in ref)
        check_reference_shape((ids, logprobs), logits, where)
        check_topk_ids(ids, logits.shape[-1], where)  # once, so that a bad row is named by its global index
        m = ids.shape[-1]
        return ids.long().reshape(-1, m), logprobs.detach().reshape(-1, m)
    return ref  # reference_probs names what is wrong with it


def softmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` along the last axis written into ``out`` (its dtype).

    Reusing one buffer per forward pass keeps the allocator out of the chunk loop: fresh
    multi-MiB blocks per chunk cost page faults that, on a busy machine, outweigh the maths.
    """
    return torch.ops.aten._softmax.out(logits.to(out.dtype), -1, False, out=out)


def reference_chunk(ref: Reference, logits: torch.Tensor, out: torch.Tensor, where: str) -> torch.Tensor:
    """``q`` for a chunk of positions, in ``out``'s dtype: reference logits are soft-maxed into
    ``out`` (float64 stays float64, and ``ref == logits`` gives ``q == p`` bit for bit); a
    top-k pair goes through :func:`~vocabmetric.regularizers.reference_probs`."""
    if isinstance(ref, torch.Tensor):  # NaN is diagnosed once the value is NaN
        return softmax_into(ref, out)
    return reference_probs(ref, logits, where).to(out.dtype)


def slice_reference(ref: Reference, part: slice) -> Reference:
    if isinstance(ref, torch.Tensor):
        return ref[part]
    if isinstance(ref, tuple):
        return ref[0][part], ref[1][part]
    return ref


def raise_bad_inputs(flat: torch.Tensor, ref: Reference, where: str) -> None:
    """Name what made a value NaN: the policy logits, or reference logits when given as a tensor."""
    named = [(flat, "policy logits")] + ([(ref, "reference logits")] if isinstance(ref, torch.Tensor) else [])
    raise_bad_logits(named, where)


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when torch
    cannot tell (its private probe is missing), which is always safe."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


class ClosedFormFunction(torch.autograd.Function):
    """Forward returns the value and saves ``∂W/∂z`` computed with it; backward scales it.

    Backward scales the saved ``∂W/∂z`` in place and hands it on as the gradient when the
    graph is not kept (autograd frees it next anyway): at N·V = 10⁸ a fresh gradient costs
    as much as a whole ``full_kl``, in page faults. With ``retain_graph=True`` it allocates.
    """

    @staticmethod
    def forward(ctx, logits, run):
        value, dz = run(logits.detach())
        ctx.save_for_backward(dz)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        (dz,) = ctx.saved_tensors
        scale = grad_value[:, None].to(dz.dtype)
        if dz.dtype == grad_value.dtype and not _graph_kept():
            return dz.mul_(scale), None
        return (scale * dz).to(grad_value.dtype), None
