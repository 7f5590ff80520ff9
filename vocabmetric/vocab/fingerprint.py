"""The tokenizer fingerprint: the check that keeps a metric on its own tokenizer's logits.

fingerprint = sha256(V, the ordered token byte strings, the special-token ids), computed by
:attr:`vocabmetric.vocab.tokenizer.Tokenizer.fingerprint` and stored in every store. Every
place that meets a metric and a tokenizer (an operator, a penalty, the TRL and verl
adapters) checks it here, with one message.

Import-light: nothing here imports the ``tokenizers`` library until a fingerprint is computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FingerprintMismatch

#: What to do when the fingerprints differ.
REBUILD = ("build the metric for this tokenizer (`vocabmetric build`, with [tokenizer] spec = "
           "\"hf:<model dir>/tokenizer.json\")")


def check_fingerprint(expected: str | None, got: str | None, what: str, *,
                      source: str = "the tokenizer", fix: str = REBUILD) -> None:
    """Raise :class:`FingerprintMismatch` when both fingerprints are known and differ.

    ``expected`` is the metric's, ``got`` the tokenizer's (``source`` names where it came
    from); either may be None (unknown), which checks nothing.
    """
    if expected and got and expected != got:
        raise FingerprintMismatch(
            f"{what}: the metric was built for another tokenizer ({expected[:12]}…) than {source} "
            f"({got[:12]}…); {fix}"
        )


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """The fingerprint of a tokenizer given as any of: a transformers fast tokenizer, a
    ``tokenizers.Tokenizer``, a ``tokenizer.json`` path or a directory holding one; None when
    it cannot be known (a slow tokenizer, a directory without ``tokenizer.json``)."""
    from .tokenizer import HFTokenizer

    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        return HFTokenizer(path).fingerprint if path.is_file() else None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        return None
    return HFTokenizer.from_hf(backend).fingerprint
