"""lm_head_penalty: the penalty from hidden states and the LM head, chunk by chunk.

Every value and gradient (hidden, head weight, bias) is compared with the plain path —
``aggregate(penalty(hidden @ W.T + b, ref), mask)`` and ``backward()`` — and the memory claim
is checked by recording the largest tensor any torch op allocates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_sinkhorn import point_cloud_operator
from test_tree_wasserstein import random_tree
from vocabmetric.errors import ConfigError, VocabMetricError
from vocabmetric.regularizers import (FullKL, SinkhornDivergence, TreeWasserstein, aggregate, full_kl,
                                      lm_head_penalty)

VOCAB, WIDTH = 60, 12


def penalties() -> dict:
    rng = np.random.default_rng(3)
    return {
        "full_kl": full_kl,
        "full_kl forward": FullKL(direction="forward"),
        "tree": TreeWasserstein([random_tree(rng, 100, VOCAB, "tokens-are-leaves") for _ in range(2)]),
        "tree torch": TreeWasserstein(random_tree(rng, 90, VOCAB, "shared"), backend="torch"),
        "sinkhorn support": SinkhornDivergence(point_cloud_operator(VOCAB, k=8), eps=0.2, support=6, tol=1e-10,
                                               max_iter=500),
    }


PENALTIES = penalties()


def head_inputs(positions=(23,), dtype=torch.float64, seed=0, bias=True):
    """Policy hidden states and head (with grad), and a reference model's, close to them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*positions, WIDTH, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, WIDTH, generator=g, dtype=torch.float64) * 0.8
    head_bias = torch.randn(VOCAB, generator=g, dtype=torch.float64) if bias else None
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.1 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight) + ((head_bias,) if bias else ())]
    return leaves + [None] * (3 - len(leaves)), ref_hidden.to(dtype), ref_weight.to(dtype)


def grads_of(loss, leaves):
    loss.backward()
    out = [None if t is None else t.grad.clone() for t in leaves]
    for t in leaves:
        if t is not None:
            t.grad = None
    return out


def plain(penalty, leaves, ref, mask=None, reduction="token-mean", logits_fn=lambda z: z):
    hidden, weight, bias = leaves
    logits = hidden.double() @ weight.double().T if hidden.dtype == torch.float64 else hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias
    mask = torch.ones(hidden.shape[:-1], dtype=torch.bool) if mask is None else mask
    return aggregate(penalty(logits_fn(logits), ref), mask, reduction)


def assert_same(got, want, rtol=1e-10, atol=1e-13):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_value_and_gradients_equal_the_plain_path(name):
    """Chunks of 5 over 23 positions (a short last chunk); the reference from its own hidden
    states and head; gradients for hidden, weight and bias alike."""
    penalty = PENALTIES[name]
    leaves, ref_hidden, ref_weight = head_inputs()
    loss = lm_head_penalty(penalty, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                           chunk_size=5)
    got = [loss.detach()] + grads_of(loss, leaves)
    want_loss = plain(penalty, leaves, ref_hidden @ ref_weight.T)
    want = [want_loss.detach()] + grads_of(want_loss, leaves)
    assert loss.shape == () and loss.dtype == torch.float64 and float(loss.detach()) > 1e-3
    assert_same(got, want, rtol=1e-9 if "sinkhorn" in name else 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 100, None])
def test_chunk_sizes_that_do_not_divide_the_positions_give_one_result(chunk_size):
    leaves, ref_hidden, ref_weight = head_inputs(bias=False)
    ref = ref_hidden @ ref_weight.T  # the reference as logits this time
    penalty = PENALTIES["tree"]
    loss = lm_head_penalty(penalty, *leaves[:2], ref, chunk_size=chunk_size)
    want_loss = plain(penalty, leaves, ref)
    assert_same([loss.detach()] + grads_of(loss, leaves), [want_loss.detach()] + grads_of(want_loss, leaves))


def test_a_top_k_reference_pair_goes_through_chunk_by_chunk():
    leaves, ref_hidden, ref_weight = head_inputs(positions=(2, 9))
    logprobs, ids = torch.log_softmax(ref_hidden @ ref_weight.T, -1).topk(5, dim=-1)
    penalty = PENALTIES["sinkhorn support"]
    loss = lm_head_penalty(penalty, *leaves[:2], (ids, logprobs), bias=leaves[2], chunk_size=4)
    want_loss = plain(penalty, leaves, (ids, logprobs))
    assert_same([loss.detach()] + grads_of(loss, leaves), [want_loss.detach()] + grads_of(want_loss, leaves),
                rtol=1e-9)


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_masks_and_reductions_are_aggregates(reduction):
    """(B, T, d) hidden states with a padding mask, one sequence empty: the reduction is
    aggregate's, and masked positions get a zero gradient."""
    leaves, ref_hidden, ref_weight = head_inputs(positions=(4, 6))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[2] = False
    mask[0, 0] = True
    penalty = PENALTIES["full_kl"]
    loss = lm_head_penalty(penalty, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                           mask=mask, reduction=reduction, chunk_size=3)
    got = [loss.detach()] + grads_of(loss, leaves)
    want_loss = plain(penalty, leaves, ref_hidden @ ref_weight.T, mask, reduction)
    assert_same(got, [want_loss.detach()] + grads_of(want_loss, leaves))
    assert got[1][~mask].abs().max() == 0 and got[1][mask].abs().min() > 0


def test_masked_positions_are_never_computed():
    """NaN hidden states at padding positions reach neither the value nor a gradient."""
    leaves, ref_hidden, ref_weight = head_inputs(positions=(3, 5), bias=False)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    with torch.no_grad():
        leaves[0][~mask] = float("nan")
        ref_hidden[~mask] = float("nan")
    loss = lm_head_penalty(PENALTIES["tree"], *leaves[:2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                           mask=mask, chunk_size=4)
    grads = grads_of(loss, leaves)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads if g is not None)
    clean = [t.detach().clone().requires_grad_() for t in leaves[:2]] + [None]
    with torch.no_grad():
        clean[0][~mask] = 0.0
    want = plain(PENALTIES["tree"], clean, torch.nan_to_num(ref_hidden) @ ref_weight.T, mask)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=0)


def test_an_empty_mask_gives_zero_still_connected():
    leaves, ref_hidden, ref_weight = head_inputs(positions=(2, 3))
    loss = lm_head_penalty(full_kl, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                           mask=torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0 and loss.requires_grad
    assert all(float(g.abs().max()) == 0 for g in grads_of(loss, leaves))


def test_bf16_hidden_states_and_head_compute_in_float32_and_return_bf16_gradients():
    """The plain path it equals: logits from the float32 upcasts (what the chunks compute)."""
    leaves, ref_hidden, ref_weight = head_inputs(positions=(3, 11), dtype=torch.bfloat16)
    for penalty in (PENALTIES["full_kl"], PENALTIES["tree"]):
        loss = lm_head_penalty(penalty, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                               chunk_size=8)
        assert loss.dtype == torch.float32
        got = [loss.detach()] + grads_of(loss, leaves)
        want_loss = plain(penalty, leaves, ref_hidden.float() @ ref_weight.float().T)
        want = [want_loss.detach()] + grads_of(want_loss, leaves)
        assert [g.dtype for g in got[1:]] == [torch.bfloat16] * 3
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(got[1:], want[1:]):  # one bf16 rounding apart at most
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-4)


def test_logits_fn_is_applied_to_policy_and_reference_logits():
    leaves, ref_hidden, ref_weight = head_inputs()

    def soft_cap(z):
        return 2.0 * torch.tanh(z / 2.0) / 0.7  # a soft cap, then a temperature

    loss = lm_head_penalty(full_kl, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                           logits_fn=soft_cap, chunk_size=6)
    want_loss = plain(full_kl, leaves, soft_cap(ref_hidden @ ref_weight.T), logits_fn=soft_cap)
    assert_same([loss.detach()] + grads_of(loss, leaves), [want_loss.detach()] + grads_of(want_loss, leaves))


def test_upstream_gradients_scale_and_a_kept_graph_backward_twice():
    leaves, ref_hidden, ref_weight = head_inputs()
    once = grads_of(lm_head_penalty(full_kl, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden,
                                    ref_weight=ref_weight), leaves)
    loss = lm_head_penalty(full_kl, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight)
    (-3 * loss).backward(retain_graph=True)
    (2 * loss).backward()
    for g, t in zip(once, leaves):
        torch.testing.assert_close(t.grad, -g, rtol=1e-12, atol=1e-15)


def test_only_what_requires_grad_gets_one_and_no_grad_gives_the_value():
    leaves, ref_hidden, ref_weight = head_inputs(bias=False)
    frozen = leaves[0].detach()
    loss = lm_head_penalty(full_kl, frozen, leaves[1], ref_hidden=ref_hidden, ref_weight=ref_weight)
    loss.backward()
    assert frozen.grad is None and leaves[1].grad is not None
    with torch.no_grad():
        value = lm_head_penalty(full_kl, *leaves[:2], ref_hidden=ref_hidden, ref_weight=ref_weight, chunk_size=7)
    assert value.grad_fn is None
    torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=0)


def test_a_hugging_face_model_gets_the_gradients_of_its_own_logits():
    """A Llama built from a config, head tied to the embeddings: the penalty from
    ``model.model(...).last_hidden_state`` and ``model.lm_head.weight`` gives every parameter
    the gradient that the penalty on ``model(...).logits`` gives, padding masked."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    policy = transformers.LlamaForCausalLM(cfg).double()
    reference = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    attention = torch.ones(2, 9, dtype=torch.long)
    attention[1, 6:] = 0
    mask = attention.bool()
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=ids, attention_mask=attention).last_hidden_state
    penalty = PENALTIES["tree"]
    grads = []
    for path in ("chunked", "plain"):
        policy.zero_grad()
        if path == "chunked":
            hidden = policy.model(input_ids=ids, attention_mask=attention).last_hidden_state
            loss = lm_head_penalty(penalty, hidden, policy.lm_head.weight, ref_hidden=ref_hidden,
                                   ref_weight=reference.lm_head.weight, mask=mask, chunk_size=5)
        else:
            logits = policy(input_ids=ids, attention_mask=attention).logits
            loss = aggregate(penalty(logits, reference(input_ids=ids, attention_mask=attention).logits.detach()), mask)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in policy.parameters()])
    assert policy.lm_head.weight is policy.model.embed_tokens.weight and float(grads[0][0]) > 0
    assert_same(grads[0], grads[1], rtol=1e-9, atol=1e-12)


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor a torch op returns (factory
    functions included: every buffer a penalty fills, numba's too, is made by torch)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("name", ["full_kl", "tree", "sinkhorn support"])
def test_no_tensor_of_n_by_v_elements_is_ever_made(name):
    """N = 400 positions, chunks of 16: no tensor the chunked path makes, forward or backward,
    is larger than the head (V·d), the hidden states (N·d) or what the penalty makes on the
    chunks of 16 positions one by one (Sinkhorn's scratch depends on how many converge); the
    plain path's reach N·V."""
    penalty = PENALTIES[name]
    if name == "sinkhorn support":  # every op passes through the Python mode: a looser tol keeps it to seconds
        penalty = SinkhornDivergence(penalty.op, eps=0.2, support=6, tol=1e-4, max_iter=30)
    leaves, ref_hidden, ref_weight = head_inputs(positions=(400,), dtype=torch.float32)
    with LargestAllocation() as one_chunk:
        for start in range(0, 400, 16):
            logits = (leaves[0][start : start + 16] @ leaves[1].T + leaves[2]).detach().requires_grad_()
            penalty(logits, ref_hidden[start : start + 16] @ ref_weight.T).sum().backward()
    bound = max(one_chunk.numel, VOCAB * WIDTH, 400 * WIDTH)
    with LargestAllocation() as chunked:
        lm_head_penalty(penalty, *leaves[:2], bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight,
                        chunk_size=16).backward()
    with LargestAllocation() as whole:
        plain(penalty, leaves, ref_hidden @ ref_weight.T).backward()
    assert chunked.numel <= bound < 400 * VOCAB / 4
    assert whole.numel >= 400 * VOCAB


def test_errors_name_what_is_wrong():
    leaves, ref_hidden, ref_weight = head_inputs(bias=False)
    hidden, weight = leaves[:2]
    ref = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(VocabMetricError, match="weight is on meta, hidden on cpu"):
        lm_head_penalty(full_kl, hidden, weight.detach().to("meta"), **ref)
    with pytest.raises(VocabMetricError, match="width d = 12 but weight .* takes d = 11"):
        lm_head_penalty(full_kl, hidden, weight[:, :11], **ref)
    with pytest.raises(VocabMetricError, match="has no positions"):
        lm_head_penalty(full_kl, hidden[:0], weight, ref_hidden=ref_hidden[:0], ref_weight=ref_weight)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="chunk_size must be a positive int"):
            lm_head_penalty(full_kl, hidden, weight, chunk_size=bad, **ref)
    with pytest.raises(ConfigError, match="unknown mode"):
        lm_head_penalty(full_kl, hidden, weight, reduction="sum", **ref)
    with pytest.raises(VocabMetricError, match="not neither"):
        lm_head_penalty(full_kl, hidden, weight)
    with pytest.raises(VocabMetricError, match="not both"):
        lm_head_penalty(full_kl, hidden, weight, ref_hidden @ ref_weight.T, **ref)
    with pytest.raises(VocabMetricError, match="ref_hidden needs ref_weight"):
        lm_head_penalty(full_kl, hidden, weight, ref_hidden=ref_hidden)
    with pytest.raises(VocabMetricError, match=r"reference logits \(23, 59\)"):
        lm_head_penalty(full_kl, hidden, weight, (ref_hidden @ ref_weight.T)[:, :59])
    with pytest.raises(VocabMetricError, match=r"mask \(\(22,\), 'cpu'\) must be a tensor of hidden's leading dims"):
        lm_head_penalty(full_kl, hidden, weight, mask=torch.ones(22, dtype=torch.bool), **ref)
    with pytest.raises(VocabMetricError, match="one value per position"):
        lm_head_penalty(lambda z, r: full_kl(z, r).mean(), hidden, weight, **ref)
    with pytest.raises(VocabMetricError, match="ref_weight has 59 rows, weight 60"):
        lm_head_penalty(full_kl, hidden, weight, ref_hidden=ref_hidden, ref_weight=ref_weight[:59])
