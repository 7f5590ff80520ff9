"""The vocabulary contract every job shares: a tokenizer's ids and texts, its fingerprint,
how each token got its vector, and how a token is shown.

Import-light: the tokenizer adapters (``tokenizers``, tiktoken) load on first use, so the
training side can check a fingerprint without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .fingerprint import check_fingerprint as check_fingerprint, tokenizer_fingerprint as tokenizer_fingerprint
from .provenance import PROVENANCE as PROVENANCE, provenance_codes as provenance_codes

if TYPE_CHECKING:
    from .tokenizer import Tokenizer as Tokenizer, load_tokenizer as load_tokenizer, visible as visible

_LAZY = {"Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "visible": "tokenizer"}

__all__ = ["PROVENANCE", "check_fingerprint", "provenance_codes", "tokenizer_fingerprint", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
