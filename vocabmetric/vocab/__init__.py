"""The vocabulary contract every job shares: a tokenizer's ids and texts, its fingerprint,
how each token got its vector, and how a token is shown.

Import-light: the tokenizer adapters (``tokenizers``, tiktoken) load on first use, so the
training side can check a fingerprint without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._util.lazy import lazy_exports
from .fingerprint import check_fingerprint as check_fingerprint, tokenizer_fingerprint as tokenizer_fingerprint
from .provenance import PROVENANCE as PROVENANCE, provenance_codes as provenance_codes

if TYPE_CHECKING:
    from .tokenizer import Tokenizer as Tokenizer, load_tokenizer as load_tokenizer, visible as visible

_LAZY = {"Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "visible": "tokenizer"}

__all__ = ["PROVENANCE", "check_fingerprint", "provenance_codes", "tokenizer_fingerprint", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
