"""SlicedWasserstein: per direction against scipy's 1-D W1, on average against POT's sliced W1."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from scipy.stats import wasserstein_distance

from conftest import moved_mass
from vocabmetric.errors import FingerprintMismatch, VocabMetricError
from vocabmetric.regularizers import SlicedWasserstein, full_kl
from vocabmetric.regularizers._inputs import reference_probs

BACKENDS = ["numba", "torch"]


def points(seed: int, vocab_size: int = 30, dim: int = 5, untrained: float = 0.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((vocab_size, dim)), rng.random(vocab_size) >= untrained


def softmaxes(*logits):
    return [torch.softmax(z, -1).numpy() for z in logits]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_direction_equals_scipy_wasserstein_distance(backend):
    emb, usable = points(0, untrained=0.25)
    assert 0 < usable.sum() < len(usable)
    logits, ref = torch.randn(3, 30, dtype=torch.float64) * 2, torch.randn(3, 30, dtype=torch.float64) * 2
    p, q = softmaxes(logits, ref)
    full = SlicedWasserstein(emb, n_projections=5, seed=3, usable=usable, backend=backend)
    per_direction = []
    for ell in range(5):
        one = SlicedWasserstein(emb, directions=full.directions_[ell : ell + 1], usable=usable, backend=backend)
        x = full.positions(ell)
        expected = [wasserstein_distance(x, x, a, b) for a, b in zip(p, q)]
        np.testing.assert_allclose(one(logits, ref).numpy(), expected, rtol=1e-10, atol=1e-14)
        per_direction.append(expected)
    np.testing.assert_allclose(full(logits, ref).numpy(), np.mean(per_direction, 0), rtol=1e-10)


def test_average_equals_pot_sliced_wasserstein_with_the_same_projections():
    emb, _ = points(1, vocab_size=40, dim=6)
    reg = SlicedWasserstein(emb, n_projections=16, seed=7)
    logits, ref = torch.randn(4, 40, dtype=torch.float64) * 3, torch.randn(4, 40, dtype=torch.float64) * 3
    p, q = softmaxes(logits, ref)
    expected = [ot.sliced_wasserstein_distance(emb, emb, a, b, projections=reg.directions_.T, p=1) for a, b in zip(p, q)]
    np.testing.assert_allclose(reg(logits, ref).numpy(), expected, rtol=1e-10)
    torch_backend = SlicedWasserstein(emb, n_projections=16, seed=7, backend="torch")
    np.testing.assert_allclose(torch_backend(logits.float(), ref.float()).numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_finite_differences(backend):
    emb, usable = points(2, vocab_size=10, dim=3, untrained=0.3)
    reg = SlicedWasserstein(emb, n_projections=4, usable=usable, backend=backend)
    logits = (torch.randn(2, 10, dtype=torch.float64) * 2).requires_grad_()
    ref = torch.randn(2, 10, dtype=torch.float64) * 2
    assert torch.autograd.gradcheck(lambda z: reg(z, ref), (logits,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_with_zero_gradient_at_the_reference(backend):
    emb, usable = points(3, untrained=0.2)
    reg = SlicedWasserstein(emb, n_projections=8, usable=usable, backend=backend)
    ref = torch.randn(2, 4, 30) * 3
    logits = ref.clone().requires_grad_()
    value = reg(logits, ref)
    assert value.shape == (2, 4) and torch.equal(value, torch.zeros(2, 4))
    value.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_for_exact_zeros_and_huge_logits(backend):
    emb, _ = points(4)
    reg = SlicedWasserstein(emb, n_projections=8, backend=backend)
    rows = torch.arange(4)
    # huge logits whose top token leads by 1e5, so that softmax is one-hot in float32
    logits = torch.randn(4, 30) * 1e4
    logits[:, :10] = float("-inf")
    logits[rows, torch.tensor([12, 25, 17, 29])] = 1e5
    ref = torch.randn(4, 30) * 1e4
    ref[:, 10:20] = float("-inf")
    ref[rows, torch.tensor([3, 25, 28, 0])] = 1e5
    logits.requires_grad_()
    value = reg(logits, ref)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logits.grad).all()
    # one-hot p and q: the mean projected distance between the two tokens
    i, j = logits.detach().argmax(-1).numpy(), ref.argmax(-1).numpy()
    expected = np.abs((emb[i] - emb[j]) @ reg.directions_.T).mean(1)
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-5)


def test_untrained_tokens_sit_at_one_far_point():
    emb, usable = points(5, untrained=0.3)
    reg = SlicedWasserstein(emb, n_projections=8, usable=usable)
    trained, untrained = np.flatnonzero(usable), np.flatnonzero(~usable)
    one_hot = lambda ids: torch.full((len(ids), 30), -1e4).scatter_(1, torch.tensor(ids)[:, None], 0.0)  # noqa: E731
    # between two untrained tokens: free; from a trained one: its gap to max + far, per direction
    between = reg(one_hot([untrained[0]]), one_hot([untrained[1]]))
    assert between.item() == 0.0
    a = trained[0]
    expected = np.mean([reg.positions(ell)[untrained[0]] - emb[a] @ reg.directions_[ell] for ell in range(8)])
    spread = [np.ptp(emb[trained] @ reg.directions_[ell]) for ell in range(8)]
    np.testing.assert_allclose(reg.far_, spread)
    np.testing.assert_allclose(reg(one_hot([a]), one_hot([untrained[0]])).item(), expected, rtol=1e-6)
    assert expected >= np.mean(spread)


def test_top_k_reference_and_seeds():
    emb, _ = points(6, vocab_size=40)
    reg = SlicedWasserstein(emb, n_projections=8, seed=1)
    logits = torch.randn(3, 40, dtype=torch.float64) * 3
    ref_logp = torch.log_softmax(torch.randn(3, 40, dtype=torch.float64) * 3, -1)
    top = ref_logp.topk(5, -1)
    q = reference_probs((top.indices, top.values), logits, "test").double()
    q = q / q.sum(-1, keepdim=True)
    torch.testing.assert_close(reg(logits, (top.indices, top.values)), reg(logits, q.log()), rtol=1e-5, atol=1e-7)
    assert np.array_equal(SlicedWasserstein(emb, n_projections=8, seed=1).directions_, reg.directions_)
    assert not np.allclose(SlicedWasserstein(emb, n_projections=8, seed=2).directions_, reg.directions_)


def test_bad_inputs_give_clear_errors(small_store):
    reg = SlicedWasserstein.from_store(small_store, n_projections=4)
    V = small_store.vocab_size
    with pytest.raises(FingerprintMismatch, match=f"{V + 1} entries.*{V} token ids"):
        reg(torch.randn(2, V + 1), torch.randn(2, V + 1))
    with pytest.raises(FingerprintMismatch, match="another tokenizer"):
        reg(torch.randn(2, V), torch.randn(2, V), fingerprint="0" * 64)
    bad = torch.randn(2, V)
    bad[0, 5] = float("nan")
    with pytest.raises(VocabMetricError, match="SlicedWasserstein: policy logits contains NaN"):
        reg(bad, torch.randn(2, V))
    with pytest.raises(VocabMetricError, match="SlicedWasserstein: policy logits row 1 .* all -inf"):
        reg(torch.cat([torch.randn(1, V), torch.full((1, V), float("-inf"))]), torch.randn(2, V))
    emb = small_store.embeddings(normalized=True)
    with pytest.raises(VocabMetricError, match="no usable token"):
        SlicedWasserstein(emb, usable=np.zeros(V, dtype=bool))
    with pytest.raises(VocabMetricError, match="usable has shape"):
        SlicedWasserstein(emb, usable=np.ones(V - 1, dtype=bool))
    with pytest.raises(VocabMetricError, match="n_projections must be a positive int"):
        SlicedWasserstein(emb, n_projections=0)


def test_moving_mass_to_a_near_token_costs_less_than_to_a_far_one(small_store):
    """The point of the seed: KL cannot tell the two moves apart; sliced W1 can."""
    usable = np.flatnonzero(small_store.usable)
    a = int(usable[np.argmax(small_store.counts[usable])])
    near = small_store.neighbors(a, k=1, metric="l2")[0].id
    far = int(usable[np.argmax(small_store.costs_from(a, usable, "l2"))])
    logits, ref = moved_mass(small_store.vocab_size, a, (near, far), mass=0.3)
    kl = full_kl(logits, ref)
    torch.testing.assert_close(kl[0], kl[1])
    reg = SlicedWasserstein.from_store(small_store, n_projections=64)
    w = reg(logits, ref)
    assert w[0] < w[1]
    emb = small_store.embeddings(normalized=True).astype(np.float64)
    expected = [0.3 * np.abs((emb[a] - emb[t]) @ reg.directions_.T).mean() for t in (near, far)]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9)


def test_numba_blocks_of_positions_equal_the_torch_backend():
    """37 positions: the CPU kernel's blocks of 16 (the last one 5, padded) give the torch
    backend's values and gradients, untrained tokens included."""
    from vocabmetric.regularizers.sliced import ROWS_AT_ONCE

    emb, usable = points(3, vocab_size=40, untrained=0.2)
    n = 2 * ROWS_AT_ONCE + 5
    gen = torch.Generator().manual_seed(4)
    z, r = torch.randn(n, 40, generator=gen) * 3, torch.randn(n, 40, generator=gen) * 3
    results = []
    for backend in ("numba", "torch"):
        reg = SlicedWasserstein(emb, n_projections=6, usable=usable, backend=backend)
        zz = z.clone().requires_grad_()
        value = reg(zz, r)
        value.sum().backward()
        results.append((value.detach(), zz.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_pca_directions_are_orthonormal_deterministic_and_follow_the_variance():
    from vocabmetric.regularizers.sliced import principal_directions

    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    usable = np.ones(400, bool)
    usable[:7] = False
    reg = SlicedWasserstein(x, n_projections=4, directions="pca", usable=usable)
    theta = reg.directions_
    assert np.allclose(theta @ theta.T, np.eye(4), atol=1e-12)
    assert np.array_equal(theta, SlicedWasserstein(x, n_projections=4, directions="pca", usable=usable).directions_)
    assert np.allclose(theta, principal_directions(x[usable], 4), atol=1e-12)
    assert np.abs(theta[0, 0]) > 0.99 and theta[0, 0] > 0  # the widest axis first, sign fixed
    assert np.array_equal(SlicedWasserstein(x, n_projections=4, directions="random", seed=1).directions_,
                          SlicedWasserstein(x, n_projections=4, seed=1).directions_)
    with pytest.raises(VocabMetricError, match="at most 6 directions"):
        SlicedWasserstein(x, n_projections=7, directions="pca")
    with pytest.raises(VocabMetricError, match="'random', 'pca'"):
        SlicedWasserstein(x, n_projections=2, directions="umap")
