"""vocabmetric: a ground metric over a tokenizer's whole vocabulary.

This is the public API. Torch is not imported here: ``vocabmetric.regularizers`` is.
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
from .pipeline import build as build, load_config as load_config
from .store import MetricStore as MetricStore, Neighbor as Neighbor, open_store as open_store
from .tokenizers import Tokenizer as Tokenizer, load_tokenizer as load_tokenizer

__version__ = "0.1.0"
