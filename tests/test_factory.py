"""regularizer_from_store: one penalty by name, from a real store."""

from __future__ import annotations

import pytest
import torch

from vocabmetric.errors import ConfigError
from vocabmetric.regularizers import (
    FullKL,
    SinkhornDivergence,
    SlicedWasserstein,
    TreeWasserstein,
    full_kl,
    regularizer_from_store,
)


@pytest.mark.parametrize("name, cls", [("sinkhorn", SinkhornDivergence), ("tree", TreeWasserstein),
                                       ("sliced", SlicedWasserstein), ("full_kl", FullKL)])
def test_each_name_builds_its_regularizer_for_the_store(name, cls, small_store):
    reg = regularizer_from_store(small_store, name)
    assert isinstance(reg, cls)
    if name != "full_kl":
        assert reg.vocab_size == small_store.vocab_size and reg.fingerprint == small_store.fingerprint


def test_sinkhorn_takes_the_metric_and_keywords(small_store):
    reg = regularizer_from_store(small_store, "sinkhorn", metric="geodesic", eps=0.2, support=16)
    assert reg.eps == 0.2 and reg.support == 16
    assert reg.op.cap == pytest.approx(small_store.operator("geodesic").cap)


def test_full_kl_module_equals_the_function():
    z, r = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(FullKL()(z, r), full_kl(z, r))
    torch.testing.assert_close(FullKL("forward")(z, r), full_kl(z, r, direction="forward"))


def test_errors_name_the_penalty_and_the_argument(small_store):
    with pytest.raises(ConfigError, match="unknown penalty 'emd'"):
        regularizer_from_store(small_store, "emd")
    with pytest.raises(ConfigError, match="penalty 'tree' takes no metric"):
        regularizer_from_store(small_store, "tree", metric="knn")
    with pytest.raises(ConfigError, match="penalty 'sliced'.*n_directions"):
        regularizer_from_store(small_store, "sliced", n_directions=4)
    with pytest.raises(ConfigError, match="unknown direction 'sideways'"):
        regularizer_from_store(small_store, "full_kl", direction="sideways")
