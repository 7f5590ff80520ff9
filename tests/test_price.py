"""The static near/far price: synthetic contexts and each penalty's ratio, on the small store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocabmetric.query.price import MOVED, TARGET_RANK, format_prices, moved_logits, near_far_prices, synthetic_contexts


def test_contexts_follow_the_rule(small_store):
    c = synthetic_contexts(small_store, 30, seed=3)
    again = synthetic_contexts(small_store, 30, seed=3)
    assert all(np.array_equal(c[k], again[k]) for k in c)  # seeded
    trained = small_store.trained & small_store.usable
    rows = np.arange(len(c["top"]))
    assert len(rows) > 20 and trained[c["top"]].all() and trained[c["near"]].all() and trained[c["far"]].all()
    ref = c["ref"].astype(np.float64)
    np.testing.assert_allclose(np.exp(ref).sum(1), 1, atol=1e-5)
    assert (ref.argmax(1) == c["top"]).all()
    assert np.array_equal(ref[rows, c["near"]], ref[rows, c["far"]])  # equal reference probability
    # near is the top's nearest trained token under l2; far is farther than it
    l2 = lambda x, y: small_store.pair_costs(x, y, "l2")
    assert (l2(c["top"], c["near"]) < l2(c["top"], c["far"])).all()
    for t in range(5):
        others = np.flatnonzero(trained)
        others = others[others != c["top"][t]]
        assert l2(c["top"][t], c["near"][t]) == pytest.approx(l2(np.full(len(others), c["top"][t]), others).min())
    near = np.exp(moved_logits(c, "near").astype(np.float64))
    moved = MOVED * np.exp(ref[rows, c["top"]])
    np.testing.assert_allclose(near[rows, c["near"]] - np.exp(ref[rows, c["near"]]), moved, rtol=1e-4)
    np.testing.assert_allclose(near.sum(1), 1, atol=1e-5)
    assert TARGET_RANK > 1


def test_prices_kl_is_one_and_tree_is_its_cost_ratio(small_store):
    rows = {(r.penalty, r.metric): r for r in near_far_prices(small_store, n_contexts=40)}
    assert rows["kl", "-"].price == pytest.approx(1.0, abs=1e-3)  # KL sees probabilities only
    assert {("sinkhorn", "knn"), ("tree", "tree"), ("sliced", "embeddings")} <= set(rows)
    # Tree-Wasserstein of one move is the mass times the tree distance: the price is the cost ratio
    c = synthetic_contexts(small_store, 40)
    ratio = small_store.pair_costs(c["top"], c["near"], "tree") / small_store.pair_costs(c["top"], c["far"], "tree")
    assert rows["tree", "tree"].price == pytest.approx(float(np.mean(ratio)), rel=2e-3)
    assert rows["sinkhorn", "knn"].price < 1 and rows["sliced", "embeddings"].price < 1
    text = format_prices(list(rows.values()))
    assert "near/far price over 40 synthetic contexts" in text


def test_cli_eval_prints_the_truth_and_the_price(small_store):
    import json

    from typer.testing import CliRunner

    from vocabmetric.cli import app

    result = CliRunner().invoke(app, ["eval", str(small_store.path), "--contexts", "20"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "over trained tokens only" in out and "10-NN contrast" in out
    assert "near/far price over 20 synthetic contexts" in out and "sinkhorn" in out and "sliced" in out
    for metric in small_store.metrics:
        assert any(line.startswith(metric) for line in out.split("10-NN contrast")[1].splitlines())
    result = CliRunner().invoke(app, ["eval", str(small_store.path), "--json", "--no-price"])
    data = json.loads(result.output)
    assert set(data) == {"human", "contrast", "price"} and data["price"] == []
    assert {r["metric"] for r in data["contrast"]} == set(small_store.metrics)
    assert all(r["pairs"] == "trained" for r in data["contrast"])


def test_mutual_operator_is_the_symmetric_intersection():
    from vocabmetric.cost import CostOperator
    from vocabmetric.query.price import union_degree

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    op = CostOperator.from_dense(d, 8, cap=float(d.max()))
    dense, mutual = op.dense(), op.mutual()
    both = (dense < op.cap) & (dense.T < op.cap)
    assert mutual.is_symmetric and both.sum() > 300
    np.testing.assert_array_equal(mutual.dense() < op.cap, both | np.eye(300, dtype=bool))
    np.testing.assert_allclose(mutual.dense()[both], np.minimum(dense, dense.T)[both], rtol=1e-6)
    assert union_degree(op) >= op.symmetrized().indices.shape[1]  # an upper bound of the union's width
