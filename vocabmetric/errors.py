"""The one small exception hierarchy of vocabmetric.

Every error a user can cause is a :class:`VocabMetricError`; the subclass says which
part of their input was wrong. Messages name the file, key, token or value and say
what to do about it.
"""

from __future__ import annotations


class VocabMetricError(Exception):
    """Base class of every error vocabmetric raises on purpose."""


class ConfigError(VocabMetricError, ValueError):
    """A pipeline config (TOML) or an argument has an unknown key, a wrong type or value."""


class CorpusError(VocabMetricError):
    """A corpus file is missing, unreadable or corrupt (the message names file and line), or the
    corpus trains too few tokens for a setting (min_count, compose, a metric's k)."""


class TokenizerError(VocabMetricError, ValueError):
    """A tokenizer spec cannot be loaded, or a token id/text is not in the vocabulary."""


class TokenNotFound(TokenizerError, KeyError):
    """A token text matches no id, or several ids (the message lists candidates)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StoreError(VocabMetricError):
    """A store is missing, unfinished, of another schema version, or lacks a metric."""


class FingerprintMismatch(VocabMetricError, ValueError):
    """An operator built for one tokenizer met logits or a tokenizer of another."""
