"""The GPU sparse log-kernel (Triton): ``LSE_{t ∈ row i} (h[nbr_t, r] + log_k_t)``.

Triton is optional: :func:`sparse_lse_kernel` returns None when it cannot be imported (a
CPU-only install) and the caller falls back to its torch path. With
``TRITON_INTERPRET=1`` set before the import, Triton runs the same kernel on CPU tensors,
which is how the tests check it on a machine without a GPU.
"""

from __future__ import annotations

import functools

import torch

#: Positions per program (one lane each) and stored entries read at once per program: a
#: tile of TILE neighbour rows × BLOCK_ROWS positions keeps TILE coalesced reads in flight.
#: 64 × 64 × 4 warps was the fastest of 18 shapes on an H100 at V = 100k, N = 1024 and
#: 8192 (``benchmarks/sparse_kernel.py --device cuda --sweep``): 2.1 × the 64 × 16 first tried.
BLOCK_ROWS = 64
TILE = 64
WARPS = 4


def padded_rows(h_t: torch.Tensor) -> torch.Tensor:
    """A copy of ``h_t (V, n)`` whose rows start every 16 elements (64 bytes in float32),
    never sharing storage with ``h_t``. Unaligned rows (n = 669, say) cost the kernel its
    vectorized loads."""
    V, n = h_t.shape
    padded = -(-n // 16) * 16
    out = torch.empty((V, padded), dtype=h_t.dtype, device=h_t.device)[:, :n]
    return out.copy_(h_t)


@functools.cache
def sparse_lse_kernel():
    """``f(h_t, indptr, nbr, log_k, dense) -> out_t``, or None without Triton.

    Shapes: ``h_t (V, n)`` log-weights with positions as the contiguous inner axis (a
    row stride that is a multiple of 16 elements lets every read be vectorized: see
    :func:`padded_rows`);
    ``indptr (V + 1,)``, ``nbr (nnz,)`` and ``log_k (nnz,)`` the CSR table of log kernel
    weights; ``dense (n,)`` a per-position term joined to every token. Returns
    ``out_t (V, n)`` — written into ``out_t`` if given, any strides (``out.t()`` of an
    ``(n, V)`` tensor writes it position-major, with no transposed copy),

    .. math:: out_t[i, r] = \\log\\Big(e^{dense_r} + \\sum_{t ∈ [indptr_i, indptr_{i+1})} e^{h_t[nbr_t, r] + log\\_k_t}\\Big),

    exact in the log domain (a running max per lane, rescaled once per tile: no
    underflow, −inf where every term is). One program per (token, block of positions),
    tokens fastest, so the ``V × BLOCK_ROWS`` slab of ``h_t`` that a block of positions
    reads stays in L2 (26 MB at V = 100k, float32, 64 positions). Each step reads a tile of
    ``TILE`` stored entries at once — TILE independent coalesced row reads in flight, which
    a one-entry-at-a-time loop (latency-bound: the neighbour id, then its row) lacks.
    Cost: O(nnz·n) reads (from L2 mostly), two ``exp`` per entry and position, O(V·n) writes.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _lse_rows(h_t, indptr, nbr, log_k, dense, out_t, n, h_s, out_si, out_sr,
                  BLOCK: tl.constexpr, TILE: tl.constexpr):
        i = tl.program_id(0)
        r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        lane = r < n
        start = tl.load(indptr + i)
        end = tl.load(indptr + i + 1)
        top = tl.full([BLOCK], float("-inf"), h_t.dtype.element_ty)
        total = tl.full([BLOCK], 0.0, h_t.dtype.element_ty)
        for t0 in range(start, end, TILE):
            t = t0 + tl.arange(0, TILE)
            real = t < end
            j = tl.load(nbr + t, mask=real, other=0).to(tl.int64)
            w = tl.load(log_k + t, mask=real, other=float("-inf"))
            x = tl.load(h_t + j[:, None] * h_s + r[None, :], mask=real[:, None] & lane[None, :],
                        other=float("-inf")) + w[:, None]
            new = tl.maximum(top, tl.max(x, 0))
            ref = tl.where(new == float("-inf"), 0.0, new)  # exp(−inf − 0) = 0: a lane of only −inf
            total = total * tl.exp(top - ref) + tl.sum(tl.exp(x - ref[None, :]), 0)
            top = new
        d = tl.load(dense + r, mask=lane, other=float("-inf"))
        new = tl.maximum(top, d)
        ref = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp(top - ref) + tl.exp(d - ref)
        tl.store(out_t + i.to(tl.int64) * out_si + r.to(tl.int64) * out_sr, ref + tl.log(total), mask=lane)

    def run(h_t: torch.Tensor, indptr: torch.Tensor, nbr: torch.Tensor, log_k: torch.Tensor,
            dense: torch.Tensor, out_t: torch.Tensor | None = None, *, block: int = BLOCK_ROWS, tile: int = TILE,
            warps: int = WARPS) -> torch.Tensor:
        V, n = h_t.shape
        if h_t.stride(1) != 1:
            raise ValueError(f"sparse_lse: h_t must have contiguous rows, got strides {h_t.stride()}")
        out_t = torch.empty_like(h_t) if out_t is None else out_t
        if n:
            _lse_rows[(V, triton.cdiv(n, block))](h_t, indptr, nbr, log_k, dense, out_t, n, h_t.stride(0),
                                                  *out_t.stride(), BLOCK=block, TILE=tile, num_warps=warps)
        return out_t

    return run
