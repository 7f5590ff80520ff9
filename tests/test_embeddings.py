"""Embeddings: word2vec rows aligned with token ids, untrained ids flagged, borrow, import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vocabmetric.building.embeddings import apply_untrained_policy, import_embeddings, train_word2vec
from vocabmetric.errors import ConfigError, VocabMetricError

VOCAB = 300
PAIRS = [(100 + 7 * k, 250 - 11 * k) for k in range(8)]  # a always right next to b; ids far apart
FILLERS = [np.arange(6 * k, 6 * k + 6) for k in range(len(PAIRS))]  # each pair's own context
FILLER_C = np.arange(60, 100)  # the context of c: never within a window of any a
C = 150
RARE = 160  # occurs twice: below min_count
NEVER = np.arange(280, 300)  # never occur


def _planted_corpus(path: Path, seed: int = 0) -> np.ndarray:
    """Lines of token ids: pair k planted adjacent among its own fillers; C among FILLER_C only."""
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(3000):
        k = n % (len(PAIRS) + 1)
        if k == len(PAIRS):
            line = list(rng.choice(FILLER_C, 12))
            line.insert(int(rng.integers(0, 12)), C)
        else:
            line = list(rng.choice(FILLERS[k], 12))
            for _ in range(2):
                at = int(rng.integers(0, len(line)))
                line[at:at] = list(PAIRS[k])
        lines.append(line)
    lines[5].append(RARE)
    lines[9].append(RARE)
    path.write_text("".join(" ".join(map(str, line)) + "\n" for line in lines))
    return np.bincount(np.concatenate([np.asarray(x) for x in lines]), minlength=VOCAB).astype(np.int64)


PARAMS = dict(dim=24, window=2, sg=1, negative=5, epochs=5, sample=0.0, min_count=3, workers=1, seed=3)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("w2v") / "corpus.txt"
    counts = _planted_corpus(path)
    return path, counts, train_word2vec(path, counts, **PARAMS)


def _cos_dist(v: np.ndarray, i: int, j: int) -> float:
    a, b = v[i], v[j]
    return 1 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_row_i_is_token_i_planted_pairs_are_close(planted):
    _, _, emb = planted
    v = emb.vectors
    assert v.shape == (VOCAB, PARAMS["dim"]) and v.dtype == np.float32
    planted_ids = np.array([C, *np.ravel(PAIRS)])
    for a, b in PAIRS:
        assert _cos_dist(v, a, b) < _cos_dist(v, a, C)
        assert _cos_dist(v, a, b) < 0.5
        # b is a's nearest planted token: rows in another order would break this for some pair
        others = planted_ids[planted_ids != a]
        nearest = others[np.argmin([_cos_dist(v, a, j) for j in others])]
        assert nearest == b, (a, b, nearest)


def test_untrained_ids_are_flagged_and_keep_a_row(planted):
    _, counts, emb = planted
    assert np.array_equal(emb.trained, counts >= PARAMS["min_count"])
    assert not emb.trained[NEVER].any() and not emb.trained[RARE]
    assert emb.trained[[C, *np.ravel(PAIRS)]].all()
    assert np.all(np.linalg.norm(emb.vectors, axis=1) > 0)  # no zero rows, even untrained
    assert np.all(emb.borrowed_from == -1)
    assert np.array_equal(emb.usable, emb.trained)
    assert emb.method == "word2vec" and emb.params["dim"] == PARAMS["dim"]


def test_single_worker_training_is_reproducible(planted):
    path, counts, emb = planted
    again = train_word2vec(path, counts, **PARAMS)
    assert np.array_equal(again.vectors, emb.vectors)
    other_seed = train_word2vec(path, counts, **{**PARAMS, "seed": 4, "epochs": 1})
    assert not np.array_equal(other_seed.vectors[emb.trained], emb.vectors[emb.trained])


def test_too_few_frequent_ids_is_a_clear_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("1 2 3\n")
    counts = np.bincount([1, 2, 3], minlength=10).astype(np.int64)
    with pytest.raises(VocabMetricError, match=r"min_count=5.*corpus.txt"):
        train_word2vec(path, counts, min_count=5)


def test_borrow_takes_the_most_frequent_normalized_match(planted):
    _, counts, emb = planted
    texts = [f"tok{i}" for i in range(VOCAB)]
    a, b = PAIRS[0]
    texts[a], texts[b] = "paris", " Paris"  # both trained; b is made more frequent below
    texts[NEVER[0]] = " PARIS"  # untrained: borrows
    texts[NEVER[1]] = "Lyon"  # untrained, no trained match: stays isolated
    counts = counts.copy()
    counts[b] = counts[a] + 1
    out = apply_untrained_policy(emb, texts, counts, "borrow")
    assert out.borrowed_from[NEVER[0]] == b
    assert np.array_equal(out.vectors[NEVER[0]], emb.vectors[b])
    assert out.borrowed_from[NEVER[1]] == -1
    assert np.array_equal(out.vectors[NEVER[1]], emb.vectors[NEVER[1]])
    assert np.all(out.borrowed_from[emb.trained] == -1)  # trained tokens keep their own vector
    assert out.usable[NEVER[0]] and not out.usable[NEVER[1]]
    assert not out.trained[NEVER[0]]  # still marked as not learned from the corpus
    assert out.params["untrained"] == "borrow"
    assert apply_untrained_policy(emb, texts, counts, "isolate") is emb
    with pytest.raises(ConfigError, match="'nearest'.*isolate.*borrow"):
        apply_untrained_policy(emb, texts, counts, "nearest")


# -- import ---------------------------------------------------------------------------------
def _matrix(rows: int, dim: int = 8) -> np.ndarray:
    m = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    m[3] = 0  # an all-zero row: a token the model never trained
    return m


def test_import_npy_drops_padding_rows(tmp_path):
    matrix = _matrix(64)
    np.save(tmp_path / "emb.npy", matrix)
    emb = import_embeddings(tmp_path / "emb.npy", 50)
    assert np.array_equal(emb.vectors, matrix[:50])
    assert emb.trained.sum() == 49 and not emb.trained[3]
    assert emb.method == "import" and emb.params["rows"] == 64


def test_import_safetensors_named_and_guessed_tensor(tmp_path):
    from safetensors.numpy import save_file

    matrix = _matrix(40)
    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": matrix, "lm_head.weight": matrix[:, ::-1].copy()}, str(path))
    guessed = import_embeddings(path, 40)
    assert np.array_equal(guessed.vectors, matrix)
    named = import_embeddings(path, 40, tensor="lm_head.weight")
    assert np.array_equal(named.vectors, matrix[:, ::-1])
    with pytest.raises(ConfigError, match="no tensor 'wte'.*lm_head.weight"):
        import_embeddings(path, 40, tensor="wte")
    save_file({"a": matrix, "b": matrix}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match=r"two.safetensors.*embeddings.tensor.*a, b"):
        import_embeddings(tmp_path / "two.safetensors", 40)


def test_import_row_count_mismatch_and_bad_files(tmp_path):
    from safetensors.numpy import save_file

    np.save(tmp_path / "small.npy", _matrix(30))
    with pytest.raises(VocabMetricError, match=r"small.npy.*30 rows.*50 ids"):
        import_embeddings(tmp_path / "small.npy", 50)
    save_file({"wte.weight": _matrix(30)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(VocabMetricError, match=r"small.safetensors.*30 rows.*50 ids"):
        import_embeddings(tmp_path / "small.safetensors", 50)
    with pytest.raises(ConfigError, match="missing.npy.*does not exist"):
        import_embeddings(tmp_path / "missing.npy", 50)
    (tmp_path / "emb.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="emb.pt.*safetensors, .npy or .gguf"):
        import_embeddings(tmp_path / "emb.pt", 50)
    np.save(tmp_path / "flat.npy", np.zeros(50, np.float32))
    with pytest.raises(VocabMetricError, match=r"flat.npy.*shape \(50,\)"):
        import_embeddings(tmp_path / "flat.npy", 50)
    bad = _matrix(50)
    bad[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(VocabMetricError, match="nan.npy.*NaN"):
        import_embeddings(tmp_path / "nan.npy", 50)
