"""Token embeddings: word2vec over token ids, or a model's own embedding matrix.

Row i of the result is token id i for every id in ``[0, V)``. Ids the corpus never showed
(or showed fewer than ``min_count`` times) are not silently given random vectors: they are
marked ``trained = False`` and the *untrained policy* decides what they get:

* ``isolate`` (default): no neighbours; every cost to them is the metric's cap.
* ``borrow``: the vector of a trained token with the same text after case and
  leading-space normalization (``" Paris"`` ← ``"paris"``), the most frequent one when
  several qualify; ``borrowed_from[i]`` records the donor, and the token gets neighbours.
* ``compose``: a vector built from the token's parts (its last BPE merge, or FastText
  n-grams; :mod:`vocabmetric.building.compose`) for every token that has text; ``composed[i]`` marks
  them. Tokens with no text (invalid UTF-8 fragments, gaps, special tokens) stay untrained.

Their rows still hold a deterministic small random vector (so nothing downstream sees a
zero row), but no metric uses a row that is not :attr:`Embeddings.usable`.

Every token's *provenance* says how it got its vector: :data:`~vocabmetric.vocab.provenance.PROVENANCE` names the codes
of :attr:`Embeddings.provenance` (and of the store's ``tokens/provenance``).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, CorpusError, VocabMetricError
from ..vocab.provenance import NONE, provenance_codes

LOG = logging.getLogger(__name__)

def stable_hash(text: str) -> int:
    """A process-independent hash for gensim's vector initialization (``hash`` is salted)."""
    return zlib.crc32(text.encode())


@dataclass
class Embeddings:
    """A (V, d) matrix with its provenance."""

    vectors: np.ndarray  # (V, d) float32
    trained: np.ndarray  # (V,) bool: learned from the corpus (or imported)
    borrowed_from: np.ndarray  # (V,) int32: donor id under the `borrow` policy, else -1
    method: str
    params: dict = field(default_factory=dict)
    seconds: float = 0.0
    composed: np.ndarray | None = None  # (V,) bool: built from the token's parts, or None

    @property
    def usable(self) -> np.ndarray:
        """Rows a metric may use: trained, borrowed from a trained token, or composed."""
        return self.provenance != NONE

    @property
    def provenance(self) -> np.ndarray:
        """(V,) uint8 codes into :data:`~vocabmetric.vocab.provenance.PROVENANCE`."""
        return provenance_codes(self.trained, self.borrowed_from, self.composed)


def train_word2vec(
    corpus_file: Path,
    counts: np.ndarray,
    *,
    dim: int = 128,
    window: int = 5,
    sg: int = 1,
    negative: int = 10,
    epochs: int = 5,
    sample: float = 1e-4,
    min_count: int = 5,
    workers: int | None = None,
    seed: int = 0,
    alpha: float = 0.025,
    deterministic: bool = False,
) -> Embeddings:
    """Word2vec (gensim, ``corpus_file`` mode) over token ids.

    The vocabulary comes from ``counts`` (no second pass over the corpus): every id with
    ``counts[i] >= min_count`` is a word named ``str(i)``. Cost: ``epochs`` passes over the
    corpus on ``workers`` threads; memory O(V·dim).

    ``deterministic=True``: byte-identical vectors for the same corpus, seed and parameters,
    in any process (vector initialization hashes with :func:`stable_hash`, not the salted
    ``hash``, so ``PYTHONHASHSEED`` does not matter), by training on one thread: threads
    interleave their updates in an order that differs run to run. Cost: training takes
    about ``workers`` times as long.
    """
    import os

    from gensim.models import Word2Vec

    vocab_size = len(counts)
    words = {str(i): int(c) for i, c in enumerate(counts) if c >= min_count}
    if len(words) < 2:
        raise CorpusError(
            f"word2vec: only {len(words)} token ids occur at least min_count={min_count} times "
            f"in {corpus_file}; use a larger corpus or a smaller min_count"
        )
    workers = 1 if deterministic else workers or os.cpu_count() or 1
    model = Word2Vec(
        vector_size=dim, window=window, sg=sg, negative=negative, sample=sample, min_count=1,
        workers=workers, seed=seed, alpha=alpha, hashfxn=stable_hash, epochs=epochs,
    )
    model.build_vocab_from_freq(words)
    start = time.perf_counter()
    # Word-based learning-rate decay over the raw token count. Passing total_examples
    # (model.corpus_count is 0 after build_vocab_from_freq) makes gensim's corpus_file
    # trainer divide by zero and train at min_alpha throughout: every vector collapses
    # onto one direction.
    model.train(corpus_file=str(corpus_file), total_words=int(counts.sum()), epochs=epochs)
    seconds = time.perf_counter() - start
    vectors = _fallback_vectors(vocab_size, dim, seed)
    trained = np.zeros(vocab_size, dtype=bool)
    ids = np.fromiter((int(w) for w in model.wv.index_to_key), dtype=np.int64)
    vectors[ids] = model.wv.vectors
    trained[ids] = True
    params = dict(dim=dim, window=window, sg=sg, negative=negative, epochs=epochs, sample=sample,
                  min_count=min_count, workers=workers, seed=seed, alpha=alpha)
    LOG.info("word2vec: %d of %d ids trained in %.1fs", trained.sum(), vocab_size, seconds)
    return Embeddings(vectors, trained, np.full(vocab_size, -1, np.int32), "word2vec", params, seconds)


def _fallback_vectors(vocab_size: int, dim: int, seed: int) -> np.ndarray:
    """Small deterministic random rows (gensim's init scale) for ids that get no training."""
    rng = np.random.default_rng(seed)
    return ((rng.random((vocab_size, dim), dtype=np.float32) - 0.5) / dim).astype(np.float32)


def import_embeddings(path: Path, vocab_size: int, *, tensor: str | None = None,
                      matrix: str = "input") -> Embeddings:
    """A model's own input (or output, ``matrix = "output"``) embedding matrix.

    ``path`` is a model directory, a ``.safetensors``, ``.npy`` or ``.gguf`` file; only the chosen
    tensor is read, by row slices (:mod:`vocabmetric.building.checkpoint`). The matrix needs at least
    ``vocab_size`` rows; rows past the tokenizer (a head padded to a multiple of 64) are
    dropped and counted in ``params["dropped_rows"]``. All-zero rows are marked untrained.
    """
    from .checkpoint import load_matrix

    found = load_matrix(Path(path), vocab_size, matrix=matrix, tensor=tensor)
    vectors = found.vectors
    trained = np.linalg.norm(vectors, axis=1) > 0
    params = dict(path=str(path), tensor=found.tensor, file=str(found.file), matrix=matrix, tied=found.tied,
                  dtype=found.dtype, rows=found.rows, dropped_rows=found.dropped_rows, dim=int(vectors.shape[1]))
    return Embeddings(vectors, trained, np.full(vocab_size, -1, np.int32), "import", params)


def apply_untrained_policy(emb: Embeddings, token_texts: list[str], counts: np.ndarray, policy: str) -> Embeddings:
    """Apply ``isolate`` (nothing to do) or ``borrow`` (see the module docstring); ``compose``
    needs the tokenizer: :func:`vocabmetric.building.compose.compose_untrained`."""
    if policy == "isolate":
        return emb
    if policy != "borrow":
        raise ConfigError(f"embeddings.untrained = {policy!r}; use 'isolate' or 'borrow' here, or 'compose' "
                          "through vocabmetric.building.compose.compose_untrained (it needs the tokenizer)")
    best: dict[str, int] = {}
    for i in np.flatnonzero(emb.trained):
        key = token_texts[i].strip().lower()
        if key and (key not in best or counts[i] > counts[best[key]]):
            best[key] = int(i)
    borrowed = emb.borrowed_from.copy()
    vectors = emb.vectors.copy()
    for i in np.flatnonzero(~emb.trained):
        donor = best.get(token_texts[i].strip().lower())
        if donor is not None:
            borrowed[i] = donor
            vectors[i] = emb.vectors[donor]
    LOG.info("borrow: %d untrained ids took a trained token's vector", (borrowed >= 0).sum())
    return Embeddings(vectors, emb.trained, borrowed, emb.method, {**emb.params, "untrained": policy}, emb.seconds,
                      emb.composed)
