"""TreeWasserstein: exact W1 for a tree metric, against POT's exact LP solver (ot.emd2)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from conftest import moved_mass
from vocabmetric.errors import FingerprintMismatch, VocabMetricError
from vocabmetric.cost import TreeMetric
from vocabmetric.regularizers import TreeWasserstein, full_kl
from vocabmetric.regularizers._inputs import reference_probs

BACKENDS = ["numba", "torch"]


def random_tree(rng, n_nodes: int, vocab_size: int, layout: str) -> TreeMetric:
    """``tokens-are-leaves``: token i is node i and internal nodes follow (TreeBuilder's
    layout); ``shared``: tokens sit on arbitrary nodes, several per node, internal included."""
    if layout == "tokens-are-leaves":
        n_internal = n_nodes - vocab_size
        parent = np.full(n_nodes, -1)
        parent[vocab_size + 1 :] = vocab_size + rng.integers(0, np.arange(1, n_internal))  # a random tree
        parent[:vocab_size] = vocab_size + rng.integers(0, n_internal, vocab_size)
        return TreeMetric(parent, rng.random(n_nodes), np.arange(vocab_size))
    parent = np.concatenate([[-1], rng.integers(0, np.arange(1, n_nodes))])
    return TreeMetric(parent, rng.random(n_nodes), rng.integers(0, n_nodes, vocab_size))


def emd2_rows(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> np.ndarray:
    return np.array([ot.emd2(a, b, cost) for a, b in zip(p, q)])


@pytest.mark.parametrize("positions", [1, 3, 4, 5, 9, 21])
def test_numba_blocks_of_positions_equal_torch_for_every_block_tail(positions):
    """The numba kernel sweeps BLOCK positions together; a short last block repeats its last
    row. Every block length gives torch's values and gradients, row by row, over 3 trees."""
    from vocabmetric.regularizers.tree import BLOCK

    assert BLOCK == 4  # the positions above cover a short block, a full one and full + short
    rng = np.random.default_rng(7)
    trees = [random_tree(rng, 60, 30, "tokens-are-leaves") for _ in range(3)]
    logits = (torch.randn(positions, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(positions)) * 3)
    ref = torch.randn(positions, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(99)) * 3
    out = {}
    for backend in BACKENDS:
        z = logits.clone().requires_grad_()
        value = TreeWasserstein(trees, backend=backend)(z, ref)
        (grad,) = torch.autograd.grad(value.sum(), z)
        out[backend] = value.detach(), grad
    torch.testing.assert_close(out["numba"][0], out["torch"][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["numba"][1], out["torch"][1], rtol=1e-10, atol=1e-13)
    for row in range(positions):  # each row alone: no row of a block leaks into another
        alone = TreeWasserstein(trees, backend="numba")(logits[row : row + 1], ref[row : row + 1])
        torch.testing.assert_close(alone[0], out["numba"][0][row], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["tokens-are-leaves", "shared"])
def test_equals_emd2_on_random_trees(backend, layout):
    rng = np.random.default_rng(1)
    for trial in range(3):
        tree = random_tree(rng, 40, 25, layout)
        logits = torch.randn(4, 25, dtype=torch.float64) * 3
        ref = torch.randn(4, 25, dtype=torch.float64) * 3
        value = TreeWasserstein(tree, backend=backend)(logits, ref)
        expected = emd2_rows(torch.softmax(logits, -1).numpy(), torch.softmax(ref, -1).numpy(), tree.dense())
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_equals_emd2_on_the_small_store_tree(small_store):
    reg = TreeWasserstein.from_store(small_store)
    V = small_store.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, dtype=torch.float64, generator=g) * 4  # peaky, like an LLM's
    ref = torch.randn(3, V, dtype=torch.float64, generator=g) * 4
    value = reg(logits, ref)
    p, q = torch.softmax(logits, -1).numpy(), torch.softmax(ref, -1).numpy()
    expected = np.mean([emd2_rows(p, q, t.dense()) for t in small_store.trees()], axis=0)  # W_T = mean of tree W1s
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9)
    # float32 and the torch backend agree with it
    np.testing.assert_allclose(reg(logits.float(), ref.float()).numpy(), expected, rtol=1e-4)
    torch_value = TreeWasserstein(small_store.tree(), backend="torch")(logits, ref)
    np.testing.assert_allclose(torch_value.numpy(), value.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_finite_differences(backend):
    rng = np.random.default_rng(2)
    for layout in ("tokens-are-leaves", "shared"):
        reg = TreeWasserstein(random_tree(rng, 16, 8, layout), backend=backend)
        logits = (torch.randn(2, 8, dtype=torch.float64) * 2).requires_grad_()
        ref = torch.randn(2, 8, dtype=torch.float64) * 2
        assert torch.autograd.gradcheck(lambda z: reg(z, ref), (logits,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_with_zero_gradient_at_the_reference(backend):
    reg = TreeWasserstein(random_tree(np.random.default_rng(3), 50, 30, "tokens-are-leaves"), backend=backend)
    ref = torch.randn(2, 5, 30) * 3
    logits = ref.clone().requires_grad_()
    value = reg(logits, ref)
    assert value.shape == (2, 5)
    assert torch.equal(value, torch.zeros(2, 5))
    value.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_for_exact_zeros_and_huge_logits(backend):
    tree = random_tree(np.random.default_rng(4), 50, 30, "tokens-are-leaves")
    reg = TreeWasserstein(tree, backend=backend)
    rows = torch.arange(4)
    # huge logits whose top token leads by 1e5, so that softmax is one-hot in float32
    logits = torch.randn(4, 30) * 1e4
    logits[:, :10] = float("-inf")  # exact zeros in p
    logits[rows, torch.tensor([12, 25, 17, 29])] = 1e5
    ref = torch.randn(4, 30) * 1e4
    ref[:, 10:20] = float("-inf")  # exact zeros in q
    ref[rows, torch.tensor([3, 25, 28, 0])] = 1e5
    logits.requires_grad_()
    value = reg(logits, ref)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logits.grad).all()
    # one-hot p and q: W1 is the tree distance between the two tokens
    i, j = logits.detach().argmax(-1), ref.argmax(-1)
    np.testing.assert_allclose(value.detach().numpy(), tree.distance(i.numpy(), j.numpy()), rtol=1e-5)


def test_top_k_reference_equals_its_dense_distribution():
    tree = random_tree(np.random.default_rng(5), 60, 40, "tokens-are-leaves")
    reg = TreeWasserstein(tree)
    logits = torch.randn(3, 40, dtype=torch.float64) * 3
    ref_logp = torch.log_softmax(torch.randn(3, 40, dtype=torch.float64) * 3, -1)
    top = ref_logp.topk(5, -1)
    value = reg(logits, (top.indices, top.values))
    q = reference_probs((top.indices, top.values), logits, "test").double()
    q = (q / q.sum(-1, keepdim=True)).numpy()
    expected = emd2_rows(torch.softmax(logits, -1).numpy(), q, tree.dense())
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)


def test_chunking_and_leading_dims_do_not_change_values():
    tree = random_tree(np.random.default_rng(6), 60, 40, "shared")
    logits, ref = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    whole = TreeWasserstein(tree)(logits, ref)
    rows = TreeWasserstein(tree, chunk_size=2)(logits.reshape(21, 40), ref.reshape(21, 40))
    torch_backend = TreeWasserstein(tree, backend="torch", chunk_size=5)(logits, ref)
    assert whole.shape == (3, 7)
    torch.testing.assert_close(rows.reshape(3, 7), whole)
    torch.testing.assert_close(torch_backend, whole)


def test_bf16_logits_are_computed_in_float32():
    tree = random_tree(np.random.default_rng(7), 60, 40, "tokens-are-leaves")
    logits = torch.randn(4, 40).bfloat16().requires_grad_()
    ref = torch.randn(4, 40).bfloat16()
    value = TreeWasserstein(tree)(logits, ref)
    value.sum().backward()
    assert value.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, TreeWasserstein(tree)(logits.detach().float(), ref.float()))


def test_bad_inputs_give_clear_errors(small_store):
    reg = TreeWasserstein.from_store(small_store)
    V = small_store.vocab_size
    with pytest.raises(FingerprintMismatch, match=f"{V + 1} entries.*{V} token ids"):
        reg(torch.randn(2, V + 1), torch.randn(2, V + 1))
    with pytest.raises(FingerprintMismatch, match="another tokenizer"):
        reg(torch.randn(2, V), torch.randn(2, V), fingerprint="0" * 64)
    reg(torch.randn(2, V), torch.randn(2, V), fingerprint=small_store.fingerprint)  # the right one passes
    bad = torch.randn(2, V)
    bad[1, 3] = float("nan")
    with pytest.raises(VocabMetricError, match="TreeWasserstein: policy logits contains NaN"):
        reg(bad, torch.randn(2, V))
    with pytest.raises(VocabMetricError, match="TreeWasserstein: reference logits contains NaN"):
        reg(torch.randn(2, V), bad)
    with pytest.raises(VocabMetricError, match="same shape"):
        reg(torch.randn(2, V), torch.randn(3, V))
    ids, logprobs = torch.tensor([[0, 1, 2]] * 2), torch.full((2, 3), -3.0)
    with pytest.raises(VocabMetricError, match=r"ids \(2, 3\) and logprobs \(2, 2\) must both be \[\.\.\., m\]"):
        reg(torch.randn(2, V), (ids, logprobs[:, :2]))
    with pytest.raises(VocabMetricError, match=r"leading dims \(3,\)"):
        reg(torch.randn(3, V), (ids, logprobs))
    with pytest.raises(VocabMetricError, match="must be a TreeMetric"):
        TreeWasserstein(small_store.operator("knn"))
    with pytest.raises(VocabMetricError, match="unknown backend"):
        TreeWasserstein(small_store.tree(), backend="cuda")


def test_moving_mass_to_a_near_token_costs_less_than_to_a_far_one(small_store):
    """The point of the seed: KL cannot tell the two moves apart; the tree metric can."""
    tree = small_store.tree()
    usable = np.flatnonzero(small_store.usable)
    a = int(usable[np.argmax(small_store.counts[usable])])  # the most frequent token
    near = small_store.neighbors(a, k=1, metric="tree")[0].id
    far = int(usable[np.argmax(tree.distance(np.full(len(usable), a), usable))])
    assert tree.distance(a, near) < tree.distance(a, far)
    logits, ref = moved_mass(small_store.vocab_size, a, (near, far), mass=0.3)
    kl = full_kl(logits, ref)
    torch.testing.assert_close(kl[0], kl[1])  # KL: the same for both moves
    w = TreeWasserstein(tree)(logits, ref)
    assert w[0] < w[1]
    np.testing.assert_allclose(w.numpy(), 0.3 * tree.distance(a, np.array([near, far])), rtol=1e-9)


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    # backward scales the saved ∂W/∂z in place unless the graph is kept: a kept graph must
    # give the same gradient on its second pass, and equal a fresh graph's
    rng = np.random.default_rng(3)
    reg = TreeWasserstein(random_tree(rng, 60, 40, "tokens-are-leaves"))
    logits, ref = torch.randn(5, 40) * 3, torch.randn(5, 40) * 3
    z = logits.clone().requires_grad_()
    value = reg(z, ref)
    (first,) = torch.autograd.grad(3 * value.sum(), z, retain_graph=True)
    (second,) = torch.autograd.grad(3 * value.sum(), z)
    fresh = logits.clone().requires_grad_()
    (3 * reg(fresh, ref).sum()).backward()
    assert first.abs().max() > 0
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(fresh.grad, first, rtol=0, atol=0)
