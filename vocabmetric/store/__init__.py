"""The metric store (zarr v3, one directory per build) and its queries.

:func:`open_store` opens a finished store read-only (checked against its manifest, see
:mod:`vocabmetric.store.integrity`); :func:`write_store` writes one atomically. The layout is in
:mod:`vocabmetric.store._schema`.
"""
from ._read import MetricStore as MetricStore, open_store as open_store
from ._schema import (
    EXACT_METRICS as EXACT_METRICS,
    SCHEMA_VERSION as SCHEMA_VERSION,
    TREE as TREE,
    Neighbor as Neighbor,
    Token as Token,
    TreeArrays as TreeArrays,
    TruncatedMetric as TruncatedMetric,
)
from ._write import write_store as write_store
