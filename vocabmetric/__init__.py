"""vocabmetric: a ground metric over a tokenizer's whole vocabulary.

This is the public API.
"""

from .errors import (
    ConfigError as ConfigError,
    CorpusError as CorpusError,
    FingerprintMismatch as FingerprintMismatch,
    StoreError as StoreError,
    TokenizerError as TokenizerError,
    TokenNotFound as TokenNotFound,
    VocabMetricError as VocabMetricError,
)
from .operator import CostOperator as CostOperator, TreeMetric as TreeMetric

__version__ = "0.1.0"
