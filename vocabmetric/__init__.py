"""vocabmetric: a ground metric over a tokenizer's whole vocabulary.

This is the public API. Torch is not imported here: ``vocabmetric.regularizers`` is. The
building side (pipeline, store, tokenizers: pydantic, zarr, gensim, faiss) is imported on
first use, so a training job that only needs ``vocabmetric.regularizers`` and an operator
does not pay for it, nor need it installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._util.lazy import lazy_exports
from .errors import (
    ConfigError as ConfigError,
    CorpusError as CorpusError,
    FingerprintMismatch as FingerprintMismatch,
    StoreError as StoreError,
    TokenizerError as TokenizerError,
    TokenNotFound as TokenNotFound,
    VocabMetricError as VocabMetricError,
)
from ._moved import install as _install_moved_paths
from ._version import __version__ as __version__
from .cost import CostOperator as CostOperator, TreeEnsemble as TreeEnsemble, TreeMetric as TreeMetric

if TYPE_CHECKING:
    from .building.pipeline import build as build, load_config as load_config
    from .store import MetricStore as MetricStore, Neighbor as Neighbor, open_store as open_store
    from .vocab.tokenizer import Tokenizer as Tokenizer, load_tokenizer as load_tokenizer


_install_moved_paths()  # old module paths import, with a warning, for one release

#: Names re-exported from the building side, each from its module, on first access.
_LAZY = {
    "build": "building.pipeline", "load_config": "building.pipeline",
    "MetricStore": "store", "Neighbor": "store", "open_store": "store",
    "Tokenizer": "vocab.tokenizer", "load_tokenizer": "vocab.tokenizer",
}


__all__ = [
    "ConfigError", "CorpusError", "FingerprintMismatch", "StoreError", "TokenizerError",
    "TokenNotFound", "VocabMetricError", "CostOperator", "TreeEnsemble", "TreeMetric", *_LAZY,
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
