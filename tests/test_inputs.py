"""The inputs every penalty shares: top-k references, dtypes, infinities, exact zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocabmetric import CostOperator, TreeMetric
from vocabmetric.errors import VocabMetricError
from vocabmetric.regularizers import (
    SinkhornDivergence,
    SlicedWasserstein,
    TreeWasserstein,
    full_kl,
    kl_estimate,
)
from vocabmetric.regularizers._inputs import reference_probs

V = 12


def penalties():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((V, 4))
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    parent = np.r_[np.full(V, V), -1]
    tree = TreeMetric(parent, np.r_[np.ones(V), 0.0], np.arange(V))
    return {
        "tree": TreeWasserstein(tree),
        "sliced": SlicedWasserstein(emb, n_projections=4),
        "sinkhorn": SinkhornDivergence(CostOperator.from_dense(dist, k=4), eps=0.5, support=4),
    }


@pytest.mark.parametrize("name", ["tree", "sliced", "sinkhorn"])
def test_a_top_k_reference_with_a_repeated_id_is_refused(name):
    reg = penalties()[name]
    logits = torch.zeros(2, V)
    ids = torch.tensor([[1, 2, 3], [5, 5, 7]])
    logprobs = torch.tensor([[0.3, 0.3, 0.3], [0.4, 0.4, 0.1]]).log()
    with pytest.raises(VocabMetricError, match="row 1 .*token id 5 more than once"):
        reg(logits, (ids, logprobs))


def test_reference_probs_refuses_a_repeated_id():
    ids, logprobs = torch.tensor([[5, 5, 7]]), torch.tensor([[0.4, 0.4, 0.1]]).log()
    with pytest.raises(VocabMetricError, match="token id 5 more than once"):
        reference_probs((ids, logprobs), torch.zeros(1, 10), "here")
    q = reference_probs((torch.tensor([[5, 6, 7]]), logprobs), torch.zeros(1, 10), "here")
    torch.testing.assert_close(q[0, [5, 6, 7]], torch.tensor([0.4, 0.4, 0.1]))


@pytest.mark.parametrize("name", ["tree", "sliced", "sinkhorn"])
def test_an_empty_top_k_reference_is_a_clear_error(name):
    reg = penalties()[name]
    empty = (torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0))
    with pytest.raises(VocabMetricError, match="m = 0 entries per position"):
        reg(torch.zeros(2, V), empty)


@pytest.mark.parametrize("name", ["tree", "sliced", "sinkhorn"])
def test_integer_logits_are_refused(name):
    reg = penalties()[name]
    with pytest.raises(VocabMetricError, match="floating-point tensor, got torch.int64"):
        reg(torch.zeros(2, V, dtype=torch.int64), torch.zeros(2, V))
    with pytest.raises(VocabMetricError, match="floating-point"):
        full_kl(torch.zeros(2, V, dtype=torch.int64), torch.zeros(2, V, dtype=torch.int64))


def test_top_k_ids_of_int32_are_widened():
    reg = penalties()["tree"]
    ids, logprobs = torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([[0.5, 0.25]]).log()
    wide = reg(torch.zeros(1, V), (ids.long(), logprobs))
    torch.testing.assert_close(reg(torch.zeros(1, V), (ids, logprobs)), wide)


def test_full_kl_names_a_top_k_reference():
    pair = (torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.25]]).log())
    with pytest.raises(VocabMetricError, match="full_kl: ref_logits must be the reference logits .* got tuple"):
        full_kl(torch.zeros(1, V), pair)


def test_kl_estimate_refuses_positive_infinity():
    with pytest.raises(VocabMetricError, match=r"kl_estimate: logp contains \+inf"):
        kl_estimate(torch.tensor([float("inf")]), torch.tensor([0.0]))
    with pytest.raises(VocabMetricError, match=r"ref_logp contains \+inf"):
        kl_estimate(torch.tensor([0.0]), torch.tensor([float("inf")]))
    assert torch.isfinite(kl_estimate(torch.tensor([float("-inf")]), torch.tensor([-1.0]))).all()


def test_full_kl_is_never_negative_for_near_equal_large_logits():
    gen = torch.Generator().manual_seed(0)
    logits = 1e4 + torch.randn(256, 1000, generator=gen)
    ref = logits + 1e-3 * torch.randn(256, 1000, generator=gen)
    for direction in ("reverse", "forward"):
        kl = full_kl(logits, ref, direction=direction)
        assert (kl >= 0).all(), kl.min()
    inf = full_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float("-inf")]]))
    assert torch.isinf(inf).all()
