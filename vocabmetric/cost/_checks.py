"""The checks every operator shares: the dense-matrix limit, the vocabulary size and the
tokenizer fingerprint (each a :class:`~vocabmetric.errors.FingerprintMismatch` or a
:class:`~vocabmetric.errors.VocabMetricError` that says what to do)."""

from __future__ import annotations

from ..errors import FingerprintMismatch, VocabMetricError
from ..vocab.fingerprint import check_fingerprint as check_fingerprint  # the one check, re-exported

#: Largest vocabulary for which ``dense()`` will build a V×V matrix (1.6 GB in float32).
DENSE_LIMIT = 20000


def _check_dense(vocab_size: int, what: str) -> None:
    if vocab_size > DENSE_LIMIT:
        raise VocabMetricError(
            f"{what}.dense() refuses V={vocab_size}: a {vocab_size}×{vocab_size} matrix is "
            f"{vocab_size**2 * 4 / 1e9:.1f} GB. dense() is for tests with V <= {DENSE_LIMIT}; "
            "use cost(i, j) or neighbors(i) instead."
        )


def check_vocab_size(covered: int, width: int, what: str, *, by: str = "the metric") -> None:
    """Raise :class:`FingerprintMismatch` unless logits of ``width`` entries fit a metric
    over ``covered`` token ids."""
    if width != covered:
        raise FingerprintMismatch(
            f"{what}: logits have {width} entries in their last dimension but {by} covers "
            f"{covered} token ids; it was built for another tokenizer "
            "(check `vocabmetric info STORE` against your model's vocabulary size)"
        )
