"""The store's schema: its layout, its version, and the arrays builders hand to it.

Layout (written by :func:`~vocabmetric.store.write_store`, read by :class:`~vocabmetric.store.MetricStore`)::

    metric.zarr/                attrs: schema_version, vocabmetric_version, created, complete,
                                       tokenizer {spec, fingerprint, vocab_size},
                                       corpus {sources, n_documents, n_tokens},
                                       embeddings {method, params, n_trained, n_borrowed,
                                                   n_composed, provenance {name: count}}
      tokens/bytes              all token byte strings concatenated (uint8)
      tokens/offsets            (V+1,) int64: token i is bytes[offsets[i]:offsets[i+1]]
      tokens/count              (V,) int64 corpus frequency
      tokens/trained            (V,) bool: the embedding was learned from the corpus
      tokens/borrowed_from      (V,) int32: donor id under the `borrow` policy, else -1
      tokens/provenance         (V,) uint8: how each token got its vector, a code into
                                vocabmetric.vocab.provenance.PROVENANCE (none, trained, borrowed,
                                composed); stores built before it derive it from
                                tokens/trained and tokens/borrowed_from
      embeddings                (V, d) float32
      projection2d              (V, 2) float32 2-D map (UMAP) of the usable tokens, NaN rows
                                for the rest (optional: stores built before it lack it)
      metrics/<name>/indices    (V, k) int32, -1 = empty slot   } attrs: kind, k, cap,
      metrics/<name>/costs      (V, k) float32                  }        cap_statistic, params
      metrics/tree/{parent, weight, leaf_of_token}   one tree: (n_nodes,), (n_nodes,), (V,)
      metrics/tree/offsets      T > 1 trees (attrs n_trees): parent, weight stacked (Σ n_nodes,),
                                node ids local to each tree, leaf_of_token (T, V), offsets (T+1,):
                                tree t is nodes offsets[t]:offsets[t+1] (absent: one tree)
      index.faiss               inner-product index over the normalized usable embeddings
      manifest.json             every other file's size and hash, every array's shape and
                                chunk count (:mod:`vocabmetric.store.integrity`)

Every chunk is written (an all-fill chunk too) and zstd-compressed with its checksum. The
store is written under a temporary name and renamed into place, with ``complete = True``
and then the manifest written last, so a killed build never leaves a store that opens,
and a damaged store is refused by name instead of served.
Token byte strings are stored as one flat byte array plus offsets: token bytes need not be
valid UTF-8, and this reads back in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np

from ..vocab.provenance import PROVENANCE

SCHEMA_VERSION = 1
EXACT_METRICS = ("l2",)  # computed on demand from the embeddings for any pair
TREE = "tree"

Token = Union[int, np.integer, str]
PROVENANCE_KEY = "tokens/provenance"


def provenance_counts(codes: np.ndarray) -> dict[str, int]:
    """``{name: tokens}`` for each provenance of :data:`~vocabmetric.vocab.provenance.PROVENANCE`
    (zeros included), from (V,) uint8 codes. O(V)."""
    counts = np.bincount(np.asarray(codes, np.intp), minlength=len(PROVENANCE))
    return {name: int(n) for name, n in zip(PROVENANCE, counts)}


class Neighbor(NamedTuple):
    """One row of a neighbour table."""

    id: int
    text: str
    cost: float


@dataclass
class TruncatedMetric:
    """Arrays of one truncated metric, as the builders produce and the store keeps them."""

    indices: np.ndarray  # (V, k) int32
    costs: np.ndarray  # (V, k) float32
    cap: float
    attrs: dict


@dataclass
class TreeArrays:
    """Arrays of the tree metric: one tree, or T trees stacked (``offsets`` (T+1,) then, see the layout)."""

    parent: np.ndarray
    weight: np.ndarray
    leaf_of_token: np.ndarray
    attrs: dict
    offsets: np.ndarray | None = None
