"""Composition for untrained tokens: last merges, the compose policy in a build, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import LEE, train_bpe

from vocabmetric import load_tokenizer, open_store
from vocabmetric.building.compose import byte_level_texts, compose_untrained, has_text, hf_merges, last_merges
from vocabmetric.building.embeddings import Embeddings
from vocabmetric.vocab.provenance import COMPOSED, NONE
from vocabmetric.errors import ConfigError
from vocabmetric.building.pipeline import build, load_config

PREFIX = 20_000
COMPOSE_CONFIG = """
[tokenizer]
spec = "hf:tokenizer.json"

[corpus]
sources = ["{lee}"]

[embeddings]
dim = 32
epochs = 10
min_count = 20
workers = 2
seed = 1
untrained = "compose"
"""


@pytest.fixture(scope="module")
def cl100k():
    """cl100k_base and the last merges of its first 20,000 ids (rank = id: a prefix of the
    ranks is itself a BPE vocabulary)."""
    tok = load_tokenizer("tiktoken:cl100k_base")
    tb = tok.token_bytes_array()[:PREFIX] + [b"", b"<|endoftext|>"]  # then a gap and a special token
    return tok, last_merges(tb, special_ids=[PREFIX + 1])


@pytest.fixture(scope="module")
def lee_build(tmp_path_factory):
    """A 3,000-token byte-level BPE on the Lee corpus, word2vec with min_count = 20 (so many
    tokens are untrained), built with ``untrained = "compose"`` and no metrics."""
    root = tmp_path_factory.mktemp("compose-build")
    train_bpe(root / "tokenizer.json", vocab_size=3000)
    config = root / "compose.toml"
    config.write_text(COMPOSE_CONFIG.format(lee=LEE.as_posix()))
    result = build(config, root / "out", progress=False)
    return load_tokenizer(f"hf:{root / 'tokenizer.json'}"), result, open_store(result.store_path)


def test_cl100k_last_merges_are_bpe_merges(cl100k):
    tok, parts = cl100k
    tb = tok.token_bytes_array()
    assert [tb[i] for i in parts[tok.find(" beautiful")[0]]] == [b" beaut", b"iful"]
    assert [tb[i] for i in parts[tok.find("中")[0]]] == [b"\xe4\xb8", b"\xad"]  # a character from two fragments
    has = np.flatnonzero(parts[:, 0] >= 0)
    assert len(has) == PREFIX - 256  # every multi-byte token, nothing else: not the gap, not the special
    assert all(tb[parts[t, 0]] + tb[parts[t, 1]] == tb[t] for t in has)
    assert np.all(parts[has] < has[:, None])  # a part is an earlier merge (rank = id)


def test_has_text(cl100k):
    tok, _ = cl100k
    text = has_text(tok.token_bytes_array(), tok.special_ids)
    assert text[tok.find(" beautiful")[0]] and text[tok.find("中")[0]]
    assert not text[100256] and not any(text[i] for i in tok.special_ids)
    assert not text[tok.token_bytes_array().index(b"\xab")]  # a lone continuation byte
    texts = byte_level_texts(tok.token_bytes_array())
    assert len(set(texts)) == tok.vocab_size and not any(" " in t or "\n" in t for t in texts)


def test_hf_merges_give_the_parts(lee_build):
    tok, _, _ = lee_build
    parts = last_merges(tok.token_bytes_array(), tok.special_ids, hf_merges(tok))
    tb = tok.token_bytes_array()
    has = np.flatnonzero(parts[:, 0] >= 0)
    assert len(has) > 2000 and all(tb[parts[t, 0]] + tb[parts[t, 1]] == tb[t] for t in has)
    assert np.all(parts[[i for i, b in enumerate(tb) if len(b) == 1]] == -1)


def _expected_composed(tok, trained: np.ndarray) -> np.ndarray:
    """Tokens with text, untrained, whose parts (recursively) have vectors; every byte has one."""
    tb = tok.token_bytes_array()
    parts = last_merges(tb, tok.special_ids, hf_merges(tok))
    have = trained.copy()
    have[[i for i, b in enumerate(tb) if len(b) == 1]] = True
    for t in sorted(range(len(tb)), key=lambda i: len(tb[i])):
        if not have[t] and parts[t, 0] >= 0:
            have[t] = have[parts[t, 0]] and have[parts[t, 1]]
    return have & ~trained & has_text(tb, tok.special_ids)


def test_compose_build_gives_vectors_exactly_where_parts_have_them(lee_build):
    tok, result, store = lee_build
    trained = store.trained
    assert 500 < trained.sum() < 0.8 * store.vocab_size  # the case is not trivial
    composed = store.provenance == COMPOSED
    np.testing.assert_array_equal(composed, _expected_composed(tok, trained))
    assert composed.sum() > 0.95 * (~trained).sum() - 200  # nearly all untrained tokens, bytes included
    assert np.array_equal(store.usable, trained | composed)
    no_text = ~has_text(tok.token_bytes_array(), tok.special_ids)
    assert np.all(store.provenance[no_text & ~trained] == NONE)
    params = store.info()["embeddings"]["params"]
    assert params["untrained"] == "compose" and params["composed"] == composed.sum()
    assert params["none_no_text"] + params["none_no_parts"] == (~store.usable).sum()
    assert result.stats["n_composed"] == composed.sum()


def test_trained_rows_are_unchanged(lee_build):
    _, result, store = lee_build
    tok = lee_build[0]
    embed_cache = [d for d in (result.store_path.parent / "cache").iterdir() if d.name.startswith("embed-")]
    assert len(embed_cache) == 1 and (embed_cache[0] / "composed.npy").is_file()
    trained = np.load(embed_cache[0] / "trained.npy")
    word2vec = np.load(embed_cache[0] / "vectors.npy").copy()
    word2vec[~trained] = 7.0  # what untrained rows held before must not matter
    again = compose_untrained(Embeddings(word2vec, trained, np.full(len(trained), -1, np.int32), "word2vec", {}), tok)
    assert np.array_equal(again.vectors[trained], store.embeddings()[trained])  # bitwise: trained rows kept
    np.testing.assert_allclose(again.vectors[again.composed], store.embeddings()[again.composed], atol=1e-6)


@pytest.mark.parametrize("kind, pattern, share, lift", [("numbers", r"^ ?\d+$", 0.6, 10), ("capitalized", r"^ ?[A-Z][a-z]+$", 0.3, 2)])
def test_composed_tokens_have_plausible_neighbours(lee_build, kind, pattern, share, lift):
    """A composed number's 10 nearest usable tokens are mostly numbers, a composed capitalized
    word's are capitalized words far above their share of the vocabulary (measured on this
    build: 93% of numbers against 1.7%, 50% of capitalized words against 13%)."""
    tok, _, store = lee_build
    member = np.array([bool(re.match(pattern, store.token_text(i))) for i in range(store.vocab_size)])
    usable = np.flatnonzero(store.usable)
    unit = store.embeddings(normalized=True)
    probes = np.flatnonzero((store.provenance == COMPOSED) & member)
    assert len(probes) >= 10, kind
    nearest = usable[np.argsort(-(unit[probes] @ unit[usable].T), axis=1)[:, 1:11]]
    assert member[nearest].mean() > share and member[nearest].mean() > lift * member[usable].mean()


def test_bad_compose_config_names_the_key(tmp_path):
    train_bpe(tmp_path / "tokenizer.json", vocab_size=300)
    bad = tmp_path / "bad.toml"
    bad.write_text(COMPOSE_CONFIG.format(lee=LEE.as_posix()) + 'compose = "bpe"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: embeddings\.compose: .*'bpe'"):
        load_config(bad)
    bad.write_text(COMPOSE_CONFIG.format(lee=LEE.as_posix()).replace('"compose"', '"composed"'))
    with pytest.raises(ConfigError, match=r"embeddings\.untrained: .*'compose'.*'composed'"):
        load_config(bad)
    no_corpus = '[tokenizer]\nspec = "hf:tokenizer.json"\n[embeddings]\nmethod = "import"\npath = "tokenizer.json"\n'
    bad.write_text(no_corpus + 'untrained = "compose"\ncompose = "fasttext"\n')
    with pytest.raises(ConfigError, match=r"embeddings\.compose = 'fasttext' .*needs a \[corpus\]"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"embeddings\.compose = 'bpe'; use one of"):
        compose_untrained(Embeddings(np.ones((2, 2), np.float32), np.ones(2, bool), np.full(2, -1, np.int32), "t"),
                          load_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}"), method="bpe")


def test_fasttext_composes_every_untrained_token_with_text(lee_build):
    tok, result, store = lee_build
    embed = next(d for d in (result.store_path.parent / "cache").iterdir() if d.name.startswith("embed-"))
    tokenize = next(d for d in (result.store_path.parent / "cache").iterdir() if d.name.startswith("tokenize-"))
    trained = np.load(embed / "trained.npy")
    emb = Embeddings(np.load(embed / "vectors.npy"), trained, np.full(len(trained), -1, np.int32), "word2vec", {})
    params = dict(dim=16, window=5, sg=1, negative=5, epochs=1, sample=1e-4, min_count=20, workers=2, seed=0, alpha=0.025)
    out = compose_untrained(emb, tok, method="fasttext", corpus_file=tokenize / "corpus.txt",
                            counts=np.load(tokenize / "counts.npy"), fasttext_params=params)
    text = has_text(tok.token_bytes_array(), tok.special_ids)
    np.testing.assert_array_equal(out.composed, text & ~trained)
    assert np.array_equal(out.vectors[trained], emb.vectors[trained]) and out.params["compose"] == "fasttext"
    assert out.params["none_no_parts"] == 0 and out.params["none_no_text"] == (~text & ~trained).sum()
