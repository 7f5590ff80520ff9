"""Vectors for untrained tokens, composed from their parts (``embeddings.untrained = "compose"``).

Two ways to compose, chosen by ``embeddings.compose``:

* ``merges`` (default): the tokenizer's own merges. A BPE token ``t`` is the merge of two
  tokens ``l + r`` (its *last merge*): for a ``tiktoken:`` encoding (or any tokenizer without
  a merges list) it is found by running byte-level BPE over ``t``'s bytes with only the
  ranks below ``t``'s (rank = id); for an ``hf:`` BPE the merges list says it. Tokens are
  composed bottom-up, shortest first, with a linear map fitted by ridge least squares on the
  trained tokens whose two parts are trained::

      v(t) = A · [u(l); u(r); 1],    A = argmin Σ_t ‖u(t) − A·[u(l); u(r); 1]‖² + λ‖A‖²

  where ``u`` is the unit vector (the metrics compare unit vectors) and ``A`` is
  ``(d, 2d + 1)``. A part that is itself untrained but composed is used as it is, so a long
  word is built up through its own merge tree. The leaves of the trees are single bytes: an
  untrained byte gets the mean unit vector of the trained tokens whose bytes contain it
  (``"\t"`` from ``"\t\t"``, ``"\tif"``, …), or of all trained tokens when none does (a
  byte the corpus never showed: an uninformative prior, so its merges lean on their other
  part), and is counted as composed when it has text. So every token with text is composed.
  (A tokenizer that is not BPE, WordPiece or Unigram, gets the replay too: a split into two
  of its own tokens, a heuristic there.) Cost: the BPE replay is O(Σ_t |t|²) byte-pair
  lookups (a few seconds for 100k tokens), the fit O(n·d²), composing O(V·d²).
* ``fasttext``: gensim's FastText over the token texts (each id written as its byte-level
  text, GPT-2's byte-to-unicode table, so n-grams are spelling) with the corpus model's
  parameters; an untrained token's FastText vector (the mean of its character n-gram
  vectors) is mapped into the corpus model's space by a least-squares map fitted on the
  trained tokens: ``v(t) = u(f(t)) · B``, ``B = argmin ‖U_w2v − U_ft · B‖²``. Cost: one more
  training run over the corpus (several times word2vec's: every word updates its n-grams).

``merges`` is the default because it measured better: on the demo build (cl100k_base, the
same word2vec vectors) its l2 Spearman on WordSim353 and SimLex-999 was above FastText's and
above the plain mean of the parts (``rule = "mean"``), at a few seconds of cost against
FastText's extra training run; ``vocabmetric eval`` on a build with each prints the figures.

Tokens with no text (byte fragments that are not valid UTF-8, empty gap ids, special
tokens) stay ``none``; a text-less fragment may still carry a vector *inside* a merge tree
(a CJK character is the merge of two fragments), but it is never usable itself. A token
with text and no vector (under ``merges``, a token no merge produces: an added token)
stays ``none`` too; ``params`` counts both (``none_no_text``, ``none_no_parts``) beside
``composed``. Trained (and borrowed) rows are never changed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .._util.vectors import normalized
from .embeddings import Embeddings
from ..errors import ConfigError, CorpusError
from ..vocab.bpe import merge_pairs

LOG = logging.getLogger(__name__)

#: The ways to compose (``embeddings.compose``); the first is the default.
COMPOSE_METHODS = ("merges", "fasttext")
#: Ridge strength of the merge map, relative to the mean squared norm of its inputs.
RIDGE = 1e-2


def has_text(token_bytes: Sequence[bytes], special_ids: Sequence[int] = ()) -> np.ndarray:
    """(V,) bool: the token is not special, not empty, and its bytes are valid UTF-8."""
    special = set(int(i) for i in special_ids)
    out = np.zeros(len(token_bytes), bool)
    for i, b in enumerate(token_bytes):
        if b and i not in special:
            try:
                b.decode("utf-8")
                out[i] = True
            except UnicodeDecodeError:
                pass
    return out


def last_merges(token_bytes: Sequence[bytes], special_ids: Sequence[int] = (),
                merges: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """(V, 2) int64: the two tokens whose merge made each token, −1 where there are none.

    With ``merges`` (an hf BPE's list, as id pairs, in priority order) a token's parts are
    those of the first merge producing it. Otherwise the parts are found by replaying BPE
    over the token's bytes with only the tokens of lower id (tiktoken: id = merge rank);
    a replay that stops at more than two parts (a token BPE itself never produces) keeps
    the last two pieces' split: the first piece and the merge of the rest, if that is a token.
    Single bytes, special and empty ids have no parts.
    """
    V = len(token_bytes)
    parts = np.full((V, 2), -1, np.int64)
    special = set(int(i) for i in special_ids)
    rank = {b: i for i, b in enumerate(token_bytes) if b and i not in special}
    if merges is not None:
        for a, b in merges:
            t = rank.get(token_bytes[a] + token_bytes[b])
            if t is not None and parts[t, 0] < 0:
                parts[t] = (a, b)
        return parts
    for t, b in enumerate(token_bytes):
        if len(b) < 2 or t in special or rank.get(b) != t:
            continue
        pieces = _bpe(b, rank, t)
        if len(pieces) > 2:  # not reachable by BPE: split off the first piece if the rest is a token
            pieces = [pieces[0], b"".join(pieces[1:])]
        if len(pieces) == 2 and pieces[0] in rank and pieces[1] in rank:
            parts[t] = (rank[pieces[0]], rank[pieces[1]])
    return parts


def _bpe(piece: bytes, rank: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's byte-pair merge of ``piece`` using only ranks ``< below``."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = rank.get(parts[i] + parts[i + 1], below)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def hf_merges(tokenizer) -> list[tuple[int, int]] | None:
    """An hf BPE tokenizer's merges as id pairs (priority order), or None (tiktoken, not BPE)."""
    import json

    hf = getattr(tokenizer, "_hf", None)
    if hf is None:
        return None
    model = json.loads(hf.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return None
    vocab = model["vocab"]
    return [(vocab[m[0]], vocab[m[1]]) for m in merge_pairs(model) if len(m) == 2 and m[0] in vocab and m[1] in vocab]


def compose_merges(emb: Embeddings, parts: np.ndarray, text: np.ndarray, token_bytes: Sequence[bytes],
                   *, rule: str = "linear", ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray, dict]:
    """Vectors of untrained tokens from their last merge (see the module docstring).

    ``rule = "mean"`` replaces the fitted map by the byte-length weighted mean of the parts'
    unit vectors, ``(|l|·u(l) + |r|·u(r)) / (|l| + |r|)`` (the baseline it was measured against).
    Returns ``(vectors (V, d) float32, composed (V,) bool, params)``; ``vectors`` equals
    ``emb.vectors`` on every row not composed.
    """
    have = emb.usable.copy()  # rows with a vector a part may use
    unit = normalized(emb.vectors).astype(np.float64)
    composed = np.zeros(len(have), bool)
    trained_ids = np.flatnonzero(emb.usable)
    for t in np.flatnonzero(~have & np.array([len(b) == 1 for b in token_bytes])):  # the leaves: single bytes
        donors = [i for i in trained_ids if token_bytes[t] in token_bytes[i]] or trained_ids
        unit[t] = normalized(unit[donors].mean(axis=0, keepdims=True))[0]
        have[t], composed[t] = True, text[t]
    fit = np.flatnonzero(emb.trained & (parts[:, 0] >= 0))
    fit = fit[emb.trained[parts[fit, 0]] & emb.trained[parts[fit, 1]]]
    if len(fit) < 2 * unit.shape[1] + 1:
        raise CorpusError(f"embeddings.untrained = 'compose': only {len(fit)} trained tokens have two trained parts, "
                          f"too few to fit the merge map (need {2 * unit.shape[1] + 1}); use 'borrow' or a larger corpus")
    X = np.hstack([unit[parts[fit, 0]], unit[parts[fit, 1]], np.ones((len(fit), 1))])
    gram = X.T @ X
    gram[np.diag_indices_from(gram)] += ridge * np.trace(gram) / len(gram)
    A = np.linalg.solve(gram, X.T @ unit[fit])  # (2d + 1, d)
    residual = float(np.mean(np.sum((X @ A - unit[fit]) ** 2, axis=1)))
    todo = np.flatnonzero(~have & (parts[:, 0] >= 0))
    for t in sorted(todo, key=lambda i: len(token_bytes[i])):  # parts are shorter than their merge
        left, right = parts[t]
        if have[left] and have[right]:
            if rule == "mean":
                v = len(token_bytes[left]) * unit[left] + len(token_bytes[right]) * unit[right]
            else:
                v = np.concatenate([unit[left], unit[right], [1.0]]) @ A
            unit[t] = v / max(np.linalg.norm(v), 1e-12)
            have[t] = True
            composed[t] = text[t]  # a text-less fragment carries a vector, but is not usable
    vectors = emb.vectors.copy()
    new = have & ~emb.usable
    vectors[new] = unit[new]
    params = {"compose": "merges", "rule": rule, "fit_tokens": int(len(fit)), "fit_residual": round(residual, 4)}
    return vectors, composed, params


def byte_level_texts(token_bytes: Sequence[bytes]) -> list[str]:
    """Each token's bytes as GPT-2 byte-level text: unique per id, no whitespace, spelling kept."""
    from ..vocab.bpe import byte_level_alphabet

    char_of = byte_level_alphabet()
    return ["".join(char_of[x] for x in b) if b else f"<empty{i}>" for i, b in enumerate(token_bytes)]


def train_fasttext(corpus_file: Path, counts: np.ndarray, words: list[str], *, dim: int, window: int, sg: int,
                   negative: int, epochs: int, sample: float, min_count: int, workers: int, seed: int,
                   alpha: float, bucket: int = 200_000) -> np.ndarray:
    """FastText over the corpus with each id written as ``words[id]``; (V, dim) vectors of every id."""
    from gensim.models import FastText

    from .embeddings import stable_hash

    with tempfile.TemporaryDirectory(prefix="vocabmetric-fasttext-") as tmp:
        text_file = Path(tmp) / "corpus.txt"
        with open(corpus_file, encoding="ascii") as src, open(text_file, "w", encoding="utf-8") as dst:
            for line in src:
                dst.write(" ".join(words[int(i)] for i in line.split()) + "\n")
        vocab = {words[i]: int(c) for i, c in enumerate(counts) if c >= min_count}
        model = FastText(vector_size=dim, window=window, sg=sg, negative=negative, sample=sample, min_count=1,
                         workers=workers, seed=seed, alpha=alpha, hashfxn=stable_hash, epochs=epochs,
                         min_n=3, max_n=6, bucket=bucket)
        model.build_vocab_from_freq(vocab)
        model.train(corpus_file=str(text_file), total_words=int(counts.sum()), epochs=epochs)
    return np.stack([model.wv.get_vector(w) for w in words]).astype(np.float32)


def compose_fasttext(emb: Embeddings, fasttext: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Untrained tokens with text get their FastText vector mapped into ``emb``'s space
    (least squares on the trained tokens, unit vectors)."""
    fit = np.flatnonzero(emb.trained)
    src, dst = normalized(fasttext).astype(np.float64), normalized(emb.vectors).astype(np.float64)
    B, *_ = np.linalg.lstsq(src[fit], dst[fit], rcond=None)
    residual = float(np.mean(np.sum((src[fit] @ B - dst[fit]) ** 2, axis=1)))
    composed = text & ~emb.usable
    vectors = emb.vectors.copy()
    vectors[composed] = normalized(src[composed] @ B)
    return vectors, composed, {"compose": "fasttext", "fit_tokens": int(len(fit)), "fit_residual": round(residual, 4)}


def compose_untrained(emb: Embeddings, tokenizer, *, method: str = "merges", corpus_file: Path | None = None,
                      counts: np.ndarray | None = None, fasttext_params: dict | None = None) -> Embeddings:
    """The ``compose`` policy: ``emb`` with ``composed`` set and the composed rows filled.

    ``tokenizer`` gives the token bytes, the special ids and (hf BPE) the merges; ``fasttext``
    also needs the corpus file, the counts and the corpus model's parameters.
    """
    if method not in COMPOSE_METHODS:
        raise ConfigError(f"embeddings.compose = {method!r}; use one of: {', '.join(map(repr, COMPOSE_METHODS))}")
    token_bytes = tokenizer.token_bytes_array()
    text = has_text(token_bytes, getattr(tokenizer, "special_ids", ()))
    if method == "merges":
        parts = last_merges(token_bytes, getattr(tokenizer, "special_ids", ()), hf_merges(tokenizer))
        vectors, composed, params = compose_merges(emb, parts, text, token_bytes)
    else:
        if corpus_file is None or counts is None:
            raise ConfigError("embeddings.compose = 'fasttext' needs a [corpus] (it trains on the corpus); "
                              "use compose = 'merges' with imported embeddings")
        words = byte_level_texts(token_bytes)
        ft = train_fasttext(corpus_file, counts, words, **(fasttext_params or {}))
        vectors, composed, params = compose_fasttext(emb, ft, text)
    unusable = ~(emb.usable | composed)
    params.update(composed=int(composed.sum()), none_no_text=int((unusable & ~text).sum()),
                  none_no_parts=int((unusable & text).sum()))
    LOG.info("compose (%s): %d untrained ids composed; %d stay none without text, %d with text but no parts "
             "that have a vector", method, params["composed"], params["none_no_text"], params["none_no_parts"])
    return Embeddings(vectors, emb.trained, emb.borrowed_from, emb.method,
                      {**emb.params, "untrained": "compose", **params}, emb.seconds, composed)
