"""A vocabmetric penalty on vocab-sharded logits (Megatron tensor parallelism), exactly.

With tensor parallelism of size T, Megatron's LM head is column-parallel: rank r holds the
logits of the token ids ``[r·V_s, (r+1)·V_s)``, ``V_s = V_pad / T`` (the vocabulary padded to
a multiple of T). Every rank of the group sees the same positions and the same reference,
so each rank computes the same penalty value and returns the gradient of its own slice;
Megatron's backward through the column-parallel head sums the input gradients.

* :func:`tree_sharded` — Tree-Wasserstein without gathering the vocabulary: the softmax
  normalizer by an all-reduce (max, then sum of exp), the subtree masses
  ``D_v = P(Γ(v)) − Q(Γ(v))`` by summing each rank's contribution (one all-reduce of
  N × (n_inner + 1) floats), the sweep up the tree on every rank; the gradient
  ``p ⊙ (g − ⟨p, g⟩)`` needs one more all-reduce of N floats for ``⟨p, g⟩``.
  Communication O(N · n_inner) instead of O(N · V).
* :func:`gather_vocab` — the exact fallback for the other penalties (Sinkhorn, Sliced):
  an autograd-aware all-gather of the shards (O(N · V) communication and memory per rank),
  the penalty on the full logits, and the local slice of the gradient in backward.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ...regularizers.tree import TreeWasserstein

LOG = logging.getLogger(__name__)

#: Elements (positions × (shard width + inner nodes)) per chunk of :func:`tree_sharded`.
CHUNK_ELEMENTS = 1 << 22


class _GatherVocab(torch.autograd.Function):
    """``[..., V_s]`` per rank → ``[..., T·V_s]``; backward returns the rank's slice."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        shard = shard.contiguous()
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard, group=group)
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


def gather_vocab(shard: torch.Tensor, group=None) -> torch.Tensor:
    """The full-vocabulary logits from this rank's shard (all ranks' shards of equal width)."""
    return _GatherVocab.apply(shard, group)


def shard_range(shard_width: int, vocab_size: int, group=None) -> tuple[int, int]:
    """``(start, stop)``: the metric token ids this rank's shard holds (stop <= V)."""
    start = dist.get_rank(group) * shard_width
    return min(start, vocab_size), min(start + shard_width, vocab_size)


class _TreeSharded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, ids, logprobs, penalty: TreeWasserstein, vocab_size: int, group):
        dtype = torch.float64 if shard.dtype == torch.float64 else torch.float32
        start, stop = shard_range(shard.shape[-1], vocab_size, group)
        layout = penalty.layout
        tables = layout.torch_tables(shard.device, dtype)
        token_weight = tables["token_weight"][start:stop]
        # the CSR target entries of this shard's tokens (sorted by token): token → inner node, per tree
        lo_t, hi_t = int(layout.target_start[start]), int(layout.target_start[stop])
        target, target_token = tables["target"][lo_t:hi_t], tables["target_token"][lo_t:hi_t] - start
        parent, weight = tables["inner_parent"], tables["inner_weight"]
        n, width = shard.shape[0], stop - start
        rows = max(1, CHUNK_ELEMENTS // (shard.shape[-1] + layout.n_inner))
        value = torch.empty(n, dtype=dtype, device=shard.device)
        dz = torch.zeros(shard.shape, dtype=dtype, device=shard.device) if ctx.needs_input_grad[0] else None
        for a in range(0, n, rows):
            b = min(a + rows, n)
            z = shard[a:b, :width].detach().to(dtype)
            p = _sharded_softmax(z, group)
            d = p - _shard_reference(ids[a:b], logprobs[a:b].to(dtype), start, stop, vocab_size)
            both = torch.zeros(b - a, layout.n_inner + 1, dtype=dtype, device=shard.device)
            both[:, : layout.n_inner].index_add_(1, target, d[:, target_token])
            both[:, -1] = d.abs() @ token_weight
            dist.all_reduce(both, group=group)
            mass = both[:, : layout.n_inner]
            for lo, hi in layout.levels[:-1]:  # deepest first; the root is the last level
                mass.index_add_(1, parent[lo:hi], mass[:, lo:hi].clone())
            value[a:b] = both[:, -1] + mass.abs() @ weight
            if dz is None:
                continue
            path = torch.sign(mass).mul_(weight)
            for lo, hi in reversed(layout.levels[:-1]):  # top-down
                path[:, lo:hi] += path[:, parent[lo:hi]]
            g = torch.sign(d).mul_(token_weight)
            g.index_add_(1, target_token, path[:, target])
            mean = (p * g).sum(-1)
            dist.all_reduce(mean, group=group)
            dz[a:b, :width] = p * (g - mean[:, None])
        ctx.save_for_backward(dz if dz is not None else torch.empty(0, device=shard.device))
        return value

    @staticmethod
    def backward(ctx, grad):
        (dz,) = ctx.saved_tensors
        return dz * grad[:, None].to(dz.dtype), None, None, None, None, None


def _sharded_softmax(z: torch.Tensor, group) -> torch.Tensor:
    """This shard's part of ``softmax`` over the whole vocabulary (two all-reduces)."""
    top = z.amax(-1) if z.shape[-1] else z.new_full(z.shape[:1], float("-inf"))
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - top[:, None])
    total = e.sum(-1)
    dist.all_reduce(total, group=group)
    return e / total[:, None]


def _shard_reference(ids, logprobs, start: int, stop: int, vocab_size: int) -> torch.Tensor:
    """This shard's part of the top-k reference (rest mass spread over the V − k others),
    normalized as :func:`~vocabmetric.regularizers.reference_probs` normalizes it."""
    top = logprobs.exp()
    total = top.sum(-1, keepdim=True)
    k = ids.shape[-1]
    rest = (1 - total).clamp_min(0) / max(vocab_size - k, 1)
    width = stop - start
    q = torch.cat([rest.expand(-1, width), rest.new_zeros(rest.shape)], dim=-1)  # last column: off-shard writes
    inside = (ids >= start) & (ids < stop)
    q.scatter_(-1, torch.where(inside, ids - start, width), torch.where(inside, top, 0.0))
    return q[:, :width] / (rest * (vocab_size - k) + total)


def tree_sharded(penalty: TreeWasserstein, shard: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                 *, vocab_size: int, group=None) -> torch.Tensor:
    """Tree-Wasserstein ``[N]`` from vocab-sharded logits ``shard [N, V_s]`` and the top-k
    reference ``(ids [N, k] int64, logprobs [N, k])`` in global ids; equal on every rank."""
    return _TreeSharded.apply(shard, ids, logprobs.detach(), penalty, vocab_size, group)


def sharded_penalty(penalty, shard: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                    *, vocab_size: int, group=None) -> torch.Tensor:
    """Penalty ``[N]`` from vocab-sharded logits: Tree by all-reduced subtree masses, the
    others on the all-gathered vocabulary (cut to the metric's ``V``)."""
    if isinstance(penalty, TreeWasserstein):
        return tree_sharded(penalty, shard, ids, logprobs, vocab_size=vocab_size, group=group)
    full = gather_vocab(shard, group)[..., :vocab_size]
    return penalty(full, (ids, logprobs))
