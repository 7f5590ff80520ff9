"""Metric quality eval: a planted store whose answer is known, and the real small store."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import spearmanr

from vocabmetric import open_store
from vocabmetric.building.embeddings import Embeddings
from vocabmetric.errors import StoreError, VocabMetricError
from vocabmetric.query.evaluation import EvalRow, dataset_path, evaluate, format_eval, read_pairs
from vocabmetric.store import TruncatedMetric, write_store


def test_datasets_are_the_published_sizes():
    ws, sl = read_pairs(dataset_path("wordsim353")), read_pairs(dataset_path("simlex999"))
    assert len(ws) == 353 and len(sl) == 999
    assert all(0 <= p.similarity <= 10 for p in ws + sl)
    assert ("tiger", "cat") in {(p.word1, p.word2) for p in ws}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store whose words are those of WordSim353's first 40 pairs, in chosen forms, with a
    metric ``planted`` costing (10 − human score)/10 on exactly the WordSim pairs (so its ρ
    must be 1) and ``reversed`` costing score/10 (ρ = −1)."""
    pairs = read_pairs(dataset_path("wordsim353"))
    words = list(dict.fromkeys(w for p in pairs[:40] for w in (p.word1, p.word2)))
    no_space, capital, untrained_word = words[1], words[2], words[3]
    texts, form = [], {}
    for w in words:
        if w == no_space:
            form[w] = w  # only "word" exists
        elif w == capital:
            form[w] = " " + w.capitalize()  # only " Word" exists
        else:
            form[w] = " " + w
        texts.append(form[w])
    texts.append(words[0])  # words[0] also exists without a space, untrained: " word" must win
    texts += [f"<filler{i}>" for i in range(20)]
    V = len(texts)
    id_of = {t: i for i, t in enumerate(texts)}
    trained = np.ones(V, bool)
    trained[id_of[form[untrained_word]]] = False
    trained[id_of[words[0]]] = False
    vectors = np.random.default_rng(0).normal(size=(V, 8)).astype(np.float32)

    known = {w: id_of[form[w]] for w in words if w != untrained_word}
    planted_rows, reversed_rows = {}, {}
    covered = []
    for p in pairs:
        if p.word1 in known and p.word2 in known and p.word1 != p.word2:
            a, b = known[p.word1], known[p.word2]
            planted_rows.setdefault(a, {})[b] = (10 - p.similarity) / 10
            reversed_rows.setdefault(a, {})[b] = p.similarity / 10
        if p.word1 in known and p.word2 in known:
            covered.append(p)

    def arrays(rows):
        k = max(len(r) for r in rows.values())
        idx, cost = np.full((V, k), -1, np.int32), np.ones((V, k), np.float32)
        for a, row in rows.items():
            idx[a, : len(row)], cost[a, : len(row)] = list(row), list(row.values())
        return TruncatedMetric(idx, cost, 1.0, {"kind": "test"})

    path = tmp_path_factory.mktemp("planted") / "metric.zarr"
    write_store(path, tokenizer=SimpleNamespace(spec="test:planted", fingerprint="cd" * 32),
                token_bytes=[t.encode() for t in texts], counts=np.ones(V, np.int64),
                embeddings=Embeddings(vectors, trained, np.full(V, -1, np.int32), "test"),
                corpus={"sources": []}, metrics={"planted": arrays(planted_rows), "reversed": arrays(reversed_rows)})
    return open_store(path), covered, known, form


def test_planted_store_gives_the_known_answer(planted):
    store, covered, known, _ = planted
    rows = {(r.metric, r.dataset): r for r in evaluate(store, ["planted", "reversed", "l2"], ["wordsim353"])}
    p, r, l2 = rows["planted", "wordsim353"], rows["reversed", "wordsim353"], rows["l2", "wordsim353"]
    assert p.n_total == 353 and p.n_pairs == len(covered) > 30
    assert p.coverage == pytest.approx(len(covered) / 353)
    # ±1 up to WordSim's own quirks: ("money", "cash") is rated twice (9.15 and 9.08) but a
    # pair has one cost (the last one planted), and a word with itself costs 0 whatever its score
    human = [c.similarity for c in covered]
    for row, score_to_cost, sign in ((p, lambda s: (10 - s) / 10, 1), (r, lambda s: s / 10, -1)):
        cost = {}
        for c in covered:
            cost[known[c.word1], known[c.word2]] = 0.0 if c.word1 == c.word2 else np.float32(score_to_cost(c.similarity))
        want = spearmanr([-cost[known[c.word1], known[c.word2]] for c in covered], human).statistic
        assert row.spearman == pytest.approx(want, abs=1e-12)
        assert sign * want > 0.85
    assert p.spearman > 0.9999
    assert p.n_stored == p.n_pairs  # every covered pair was planted (or is a word with itself)
    # l2 on random vectors: whatever it is, it is the Spearman of -l2 over the same pairs
    a = np.array([known[c.word1] for c in covered])
    b = np.array([known[c.word2] for c in covered])
    unit = store.embeddings(normalized=True).astype(np.float64)
    d = np.where(a == b, 0, np.linalg.norm(unit[a] - unit[b], axis=1))
    assert l2.spearman == pytest.approx(spearmanr(-d, [c.similarity for c in covered]).statistic, abs=1e-6)
    assert l2.n_pairs == p.n_pairs


def test_word_forms_and_untrained_words(planted):
    from vocabmetric.query.evaluation import token_of_word

    store, _, known, form = planted
    words = list(form)
    assert token_of_word(store, words[0]) == store.resolve(" " + words[0])  # " word" before "word"
    assert token_of_word(store, words[1]) == store.resolve(words[1])  # "word" when no " word"
    assert token_of_word(store, words[2]) == store.resolve(" " + words[2].capitalize())
    assert token_of_word(store, words[3]) is None  # untrained: not covered
    assert token_of_word(store, "zebra") is None


def test_planted_uncovered_pairs_cost_the_cap(planted):
    """SimLex pairs among the planted words are covered, but their costs were not planted:
    they cost the cap and do not count as stored."""
    store, _, known, _ = planted
    (row,) = evaluate(store, ["planted"], ["simlex999"])
    simlex = read_pairs(dataset_path("simlex999"))
    assert row.n_total == 999
    covered = [p for p in simlex if p.word1 in known and p.word2 in known]
    assert row.n_pairs == len(covered)
    assert row.n_stored <= row.n_pairs


def test_errors(planted, tmp_path):
    store = planted[0]
    with pytest.raises(StoreError, match="has no metric 'geodesic'"):
        evaluate(store, ["geodesic"])
    with pytest.raises(VocabMetricError, match="unknown dataset 'men3000'"):
        evaluate(store, ["l2"], ["men3000"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("# header\ncat\tdog\tvery\n")
    with pytest.raises(VocabMetricError, match=r"bad.tsv:2: expected 'word1<TAB>word2<TAB>score'"):
        read_pairs(bad)


def test_small_store_eval_and_table(small_store):
    rows = evaluate(small_store)
    assert {(r.metric, r.dataset) for r in rows} == {(m, d) for m in small_store.metrics for d in ("wordsim353", "simlex999")}
    for r in rows:
        assert isinstance(r, EvalRow)
        assert 0 <= r.n_stored <= r.n_pairs <= r.n_total and r.coverage == pytest.approx(r.n_pairs / r.n_total)
        assert np.isnan(r.spearman) or -1 <= r.spearman <= 1
    # a 1000-token BPE covers only a few words; l2 and tree are exact, so all their pairs are stored
    by = {(r.metric, r.dataset): r for r in rows}
    assert by["l2", "wordsim353"].n_pairs == by["knn", "wordsim353"].n_pairs > 0
    assert by["l2", "simlex999"].n_stored == by["l2", "simlex999"].n_pairs
    text = format_eval(rows)
    assert "wordsim353" in text and "cost the cap" in text
    warnings = {r.dataset for r in rows if r.n_pairs < 30}
    assert len(text.splitlines()) == 2 + len(rows) + 7 + len(warnings)
    assert "all-pairs" in text.splitlines()[0] and "covered" in text.splitlines()[0]


def _direct_all_pairs(store, dataset: str, cost_of) -> tuple[float, int, int]:
    """ρ over all single-token pairs, straight from scipy: each word's first usable
    single-token form, else its first single-token form; a pair with an unusable token
    costs ``cost_of``'s cap. Returns (ρ, single-token pairs, usable pairs)."""
    def token(word):
        forms = [" " + word, word, " " + word[:1].upper() + word[1:], word[:1].upper() + word[1:]]
        single = [store.ids_of_text(f)[0] for f in forms if len(store.ids_of_text(f)) == 1]
        return ([i for i in single if store.usable[i]] or single or [None])[0]

    found = [(token(p.word1), token(p.word2), p.similarity) for p in read_pairs(dataset_path(dataset))]
    found = [f for f in found if f[0] is not None and f[1] is not None]
    a, b, human = (np.array([f[k] for f in found]) for k in range(3))
    cost = cost_of(a, b)
    rho = spearmanr(-cost, human).statistic if np.ptp(cost) > 0 else np.nan  # a constant cost has no ρ
    return rho, len(found), int(np.sum(store.usable[a] & store.usable[b]))


def test_all_pairs_spearman_and_coverage_against_scipy(planted, small_store):
    """The all-pairs ρ and the single-token coverage, computed directly: l2 (cap 2) and the
    planted truncated metric (cap 1) on the planted store, whose untrained word is single-token
    but not usable; l2 and knn (dense) on the real small store."""
    store = planted[0]
    unit = store.embeddings(normalized=True).astype(np.float64)

    def l2(a, b, s=store, u=unit):
        return np.where(a == b, 0, np.where(s.usable[a] & s.usable[b], np.linalg.norm(u[a] - u[b], axis=1), 2.0))

    def planted_cost(a, b, dense=store.operator("planted").dense()):
        return np.where(a == b, 0, np.where(store.usable[a] & store.usable[b], dense[a, b], 1.0))

    for metric, cost_of in (("l2", l2), ("planted", planted_cost)):
        (row,) = evaluate(store, [metric], ["wordsim353"])
        rho, n_single, n_usable = _direct_all_pairs(store, "wordsim353", cost_of)
        assert row.n_single == n_single > row.n_pairs == n_usable  # the untrained word's pairs count here only
        assert row.single_coverage == pytest.approx(n_usable / n_single)
        assert row.spearman_all == pytest.approx(rho, abs=1e-6)
    unit = small_store.embeddings(normalized=True).astype(np.float64)
    knn = small_store.operator("knn")
    dense = knn.dense()
    rows = {(r.metric, r.dataset): r for r in evaluate(small_store, ["l2", "knn"])}
    for dataset in ("wordsim353", "simlex999"):
        for metric, cost_of in (("l2", lambda a, b: l2(a, b, small_store, unit)),
                                ("knn", lambda a, b: np.where(small_store.usable[a] & small_store.usable[b],
                                                              dense[a, b], np.float32(knn.cap)))):
            rho, n_single, n_usable = _direct_all_pairs(small_store, dataset, cost_of)
            row = rows[metric, dataset]
            assert (row.n_single, row.n_pairs) == (n_single, n_usable) and n_single > 0
            np.testing.assert_allclose(row.spearman_all, rho, atol=1e-6)  # NaN (a constant cost) on both sides too


def test_tree_fidelity_on_the_small_store(small_store):
    from vocabmetric.query.evaluation import format_fidelity, tree_fidelity

    f = tree_fidelity(small_store, n_pairs=3000, n_sources=200)
    assert f == tree_fidelity(small_store, n_pairs=3000, n_sources=200)  # seeded
    assert -1 <= f.spearman <= 1 and 0 < f.l2_contrast < 1 and f.tree_contrast > 0
    assert f.n_near > 0 and 0 < f.n_random <= 3000 and f.n_trees == small_store.n_trees
    assert "spearman(tree, l2)" in format_fidelity(f) and "random trained pairs" in format_fidelity(f)


def test_contrast_of_every_metric_is_over_trained_pairs(small_store):
    """Every metric beside l2 on the same seeded *trained* pairs; l2 beside itself is exact."""
    from vocabmetric.query.evaluation import FIDELITY_NEAR, format_contrast, metric_contrast, trained_pairs

    rows = metric_contrast(small_store, n_pairs=3000, n_sources=200)
    assert rows == metric_contrast(small_store, n_pairs=3000, n_sources=200)  # seeded
    assert [r.metric for r in rows] == small_store.metrics
    (a, b), (i, j) = trained_pairs(small_store, n_pairs=3000, n_sources=200)
    trained = small_store.trained
    assert trained[a].all() and trained[b].all() and trained[i].all() and trained[j].all()
    assert (a != b).all() and (i != j).all() and np.bincount(np.unique(i, return_inverse=True)[1]).max() <= FIDELITY_NEAR
    by = {r.metric: r for r in rows}
    l2 = by["l2"]
    assert l2.spearman == pytest.approx(1.0) and l2.contrast == pytest.approx(l2.l2_contrast) and 0 < l2.contrast < 1
    d_near, d_rand = (small_store.pair_costs(x, y, "l2").astype(np.float64) for x, y in ((i, j), (a, b)))
    assert l2.contrast == pytest.approx(d_near.mean() / np.median(d_rand))
    assert all(r.pairs == "trained" and r.n_near == len(i) for r in rows)
    text = format_contrast(rows)
    assert "over trained tokens only" in text and "tree" in text


def test_few_pairs_are_flagged(small_store):
    from vocabmetric.query.evaluation import MIN_PAIRS

    rows = evaluate(small_store, ["l2"])
    text = format_eval(rows)
    few = [r for r in rows if r.n_pairs < MIN_PAIRS]
    assert few, "the 1000-token BPE covers few pairs: the warning must show"
    for r in few:
        assert f"warning: {r.dataset}'s spearman rests on {r.n_pairs} pair" in text
    assert sum(line.startswith("warning:") for line in text.splitlines()) == len({r.dataset for r in few})
