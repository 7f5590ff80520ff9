"""Texts wherever ids are (``costs_from``, ``pair_costs``), and the CLI saying when it
returns fewer rows than asked or a pair's cap (issue 28, point 5). On the small real store."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from vocabmetric.cli import app
from vocabmetric.errors import TokenNotFound

runner = CliRunner()


def _word_ids(store, n: int) -> list[int]:
    """``n`` usable tokens whose text names only them and starts with a space."""
    out = []
    for i in np.flatnonzero(store.usable):
        text = store.token_text(i)
        if text.startswith(" ") and text[1:].isalpha() and store.ids_of_text(text) == [int(i)]:
            out.append(int(i))
        if len(out) == n:
            return out
    pytest.fail("too few word tokens in the small store")


@pytest.mark.parametrize("metric", ["l2", "knn", "tree"])
def test_costs_from_and_pair_costs_take_texts_like_ids(small_store, metric):
    a, b, c = _word_ids(small_store, 3)
    text = small_store.token_text
    by_id = small_store.costs_from(a, np.array([b, c, 7]), metric)
    np.testing.assert_array_equal(small_store.costs_from(text(a), [text(b), text(c), 7], metric), by_id)
    np.testing.assert_array_equal(small_store.costs_from(text(a), (text(b),), metric), by_id[:1])
    np.testing.assert_array_equal(small_store.pair_costs([text(a), text(b)], text(c), metric),
                                  small_store.pair_costs(np.array([a, b]), c, metric))
    assert small_store.costs_from(text(a), text(b), metric)[0] == pytest.approx(small_store.cost(a, b, metric))


def test_costs_from_names_an_unknown_text(small_store):
    with pytest.raises(TokenNotFound, match="zzqqxx"):
        small_store.costs_from(" the", [" zzqqxx"], "knn")


def test_neighbors_beyond_the_stored_k_says_so_on_stderr(small_store):
    stored = small_store.operator("knn").k
    result = runner.invoke(app, ["neighbors", str(small_store.path), " the", "-k", str(stored + 20), "-m", "knn"])
    assert result.exit_code == 0, result.output
    assert f"{stored} of the {stored + 20} asked" in result.stderr and f"knn stores {stored}" in result.stderr
    assert "note" not in result.stdout
    result = runner.invoke(app, ["neighbors", str(small_store.path), " the", "-k", str(stored), "-m", "knn"])
    assert result.stderr == ""


def test_cost_says_when_the_pair_is_not_stored_and_the_value_is_the_cap(small_store):
    a = _word_ids(small_store, 1)[0]
    op = small_store.operator("knn")
    far = next(j for j in range(small_store.vocab_size) if j != a and j not in op.indices[a])
    near = int(op.neighbors(a)[0][0])
    result = runner.invoke(app, ["cost", str(small_store.path), str(a), str(far), "-m", "knn"])
    assert result.exit_code == 0, result.output
    assert float(result.stdout) == pytest.approx(op.cap, rel=1e-5)
    assert "the cap of knn" in result.stderr and f"{op.k} stored knn neighbours" in result.stderr
    result = runner.invoke(app, ["cost", str(small_store.path), str(a), str(near), "-m", "knn"])
    assert float(result.stdout) < op.cap and result.stderr == ""
    assert small_store.is_stored(a, near, "knn") and not small_store.is_stored(a, far, "knn")
