"""The metric store (zarr v3, one directory per build) and its queries.

Layout::

    metric.zarr/                attrs: schema_version, vocabmetric_version, created, complete,
                                       tokenizer {spec, fingerprint, vocab_size},
                                       corpus {sources, n_documents, n_tokens},
                                       embeddings {method, params, n_trained, n_borrowed}
      tokens/bytes              all token byte strings concatenated (uint8)
      tokens/offsets            (V+1,) int64: token i is bytes[offsets[i]:offsets[i+1]]
      tokens/count              (V,) int64 corpus frequency
      tokens/trained            (V,) bool: the embedding was learned from the corpus
      tokens/borrowed_from      (V,) int32: donor id under the `borrow` policy, else -1
      embeddings                (V, d) float32
      projection2d              (V, 2) float32 2-D map (UMAP) of the usable tokens, NaN rows
                                for the rest (optional: stores built before it lack it)
      metrics/<name>/indices    (V, k) int32, -1 = empty slot   } attrs: kind, k, cap,
      metrics/<name>/costs      (V, k) float32                  }        cap_statistic, params
      metrics/tree/{parent, weight, leaf_of_token}
      index.faiss               inner-product index over the normalized usable embeddings

The store is written under a temporary name and renamed into place, with
``complete = True`` written last, so a killed build never leaves a store that opens.
Token byte strings are stored as one flat byte array plus offsets: token bytes need not be
valid UTF-8, and this reads back in one call.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Union

import numpy as np

from . import _vectors
from ._version import __version__
from .errors import StoreError, TokenizerError, TokenNotFound, VocabMetricError
from .operator import CostOperator, TreeMetric

LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EXACT_METRICS = ("l2",)  # computed on demand from the embeddings for any pair
TREE = "tree"

Token = Union[int, np.integer, str]


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
    parent: np.ndarray
    weight: np.ndarray
    leaf_of_token: np.ndarray
    attrs: dict


def write_store(
    path: Path,
    *,
    tokenizer: Any,
    token_bytes: list[bytes],
    counts: np.ndarray,
    embeddings: Any,
    corpus: Mapping[str, Any],
    metrics: Mapping[str, TruncatedMetric] = {},
    tree: TreeArrays | None = None,
    extra_arrays: Mapping[str, np.ndarray] = {},
) -> Path:
    """Write a complete store at ``path`` atomically (temporary directory, then rename).

    ``embeddings`` is an :class:`vocabmetric.embeddings.Embeddings`. An existing store at
    ``path`` is replaced only once the new one is complete.
    """
    import zarr

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    vocab_size = len(token_bytes)
    vectors = embeddings.vectors
    if vectors.shape[0] != vocab_size or len(counts) != vocab_size:
        raise StoreError(
            f"write_store: embeddings {vectors.shape}, counts {counts.shape} and the tokenizer's "
            f"{vocab_size} ids disagree"
        )
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    rows = 4096
    tokens = root.require_group("tokens")
    lengths = np.fromiter((len(b) for b in token_bytes), dtype=np.int64, count=vocab_size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.frombuffer(b"".join(token_bytes), dtype=np.uint8)
    tokens.create_array("bytes", data=flat if flat.size else np.zeros(0, np.uint8), chunks=(1 << 20,))
    tokens.create_array("offsets", data=offsets, chunks=(1 << 18,))
    tokens.create_array("count", data=np.asarray(counts, np.int64), chunks=(1 << 18,))
    tokens.create_array("trained", data=np.asarray(embeddings.trained, bool), chunks=(1 << 18,))
    tokens.create_array("borrowed_from", data=np.asarray(embeddings.borrowed_from, np.int32), chunks=(1 << 18,))
    root.create_array("embeddings", data=np.asarray(vectors, np.float32), chunks=(rows, vectors.shape[1]))
    for name, arr in extra_arrays.items():
        root.create_array(name, data=arr, chunks=(rows,) + arr.shape[1:])
    if metrics or tree is not None:
        group = root.require_group("metrics")
        for name, m in metrics.items():
            g = group.require_group(name)
            g.create_array("indices", data=np.asarray(m.indices, np.int32), chunks=(rows, m.indices.shape[1]))
            g.create_array("costs", data=np.asarray(m.costs, np.float32), chunks=(rows, m.costs.shape[1]))
            g.attrs.update(_jsonable({**m.attrs, "cap": float(m.cap), "k": int(m.indices.shape[1])}))
        if tree is not None:
            g = group.require_group(TREE)
            for field in ("parent", "weight", "leaf_of_token"):
                g.create_array(field, data=np.asarray(getattr(tree, field)), chunks=(1 << 18,))
            g.attrs.update(_jsonable({**tree.attrs, "kind": TREE}))
    _write_faiss_index(tmp / "index.faiss", vectors, embeddings.usable)
    root.attrs.update(
        _jsonable(
            {
                "schema_version": SCHEMA_VERSION,
                "vocabmetric_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "tokenizer": {"spec": tokenizer.spec, "fingerprint": tokenizer.fingerprint, "vocab_size": vocab_size},
                "corpus": dict(corpus),
                "embeddings": {
                    "method": embeddings.method,
                    "params": embeddings.params,
                    "dim": int(vectors.shape[1]),
                    "n_trained": int(np.sum(embeddings.trained)),
                    "n_borrowed": int(np.sum(embeddings.borrowed_from >= 0)),
                },
            }
        )
    )
    root.attrs["complete"] = True  # last: only a finished store carries it
    _replace_dir(tmp, path)
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is removed only after the move succeeds."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_faiss_index(path: Path, vectors: np.ndarray, usable: np.ndarray) -> None:
    import faiss

    ids = np.flatnonzero(usable).astype(np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(ids):
        index.add_with_ids(_vectors.normalized(vectors[ids]), ids)
    faiss.write_index(index, str(path))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def open_store(path: str | os.PathLike) -> "MetricStore":
    """Open a finished store read-only. Clear errors for a missing or unfinished one."""
    return MetricStore(path)


class MetricStore:
    """Read-only queries on a store: neighbours, costs, operators, embeddings.

    A *token* is an id (int) or a text (``" beautiful"``, leading space included). Arrays
    load lazily and are cached; the store is safe to query from several threads.

    >>> store = open_store("runs/demo/metric.zarr")          # doctest: +SKIP
    >>> store.neighbors(" beautiful", k=3, metric="knn")      # doctest: +SKIP
    [Neighbor(id=24415, text=' gorgeous', cost=0.61), ...]
    """

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            hint = " (a build directory? open its metric.zarr)" if (self.path / "metric.zarr").is_dir() else ""
            raise StoreError(f"{self.path} is not a vocabmetric store{hint}; build one with `vocabmetric build CONFIG`")
        self._root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        self.attrs = dict(self._root.attrs)
        if not self.attrs.get("complete"):
            raise StoreError(f"{self.path} is an unfinished store (its build was interrupted); rerun `vocabmetric build`")
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this vocabmetric ({__version__}) reads "
                f"version {SCHEMA_VERSION}. Rebuild the store or use a matching vocabmetric."
            )
        self._lock = threading.Lock()

    # -- what is in it ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.attrs["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return self.attrs["tokenizer"]["fingerprint"]

    @property
    def tokenizer_spec(self) -> str:
        return self.attrs["tokenizer"]["spec"]

    @cached_property
    def metrics(self) -> list[str]:
        """Every metric the store answers: ``l2`` (exact), the stored ones, and ``tree``."""
        stored = sorted(self._root["metrics"].group_keys()) if "metrics" in self._root else []
        return list(EXACT_METRICS) + [m for m in stored if m not in EXACT_METRICS]

    def metric_attrs(self, metric: str) -> dict:
        self._check_metric(metric)
        if metric in EXACT_METRICS and f"metrics/{metric}" not in self._root:
            return {"kind": metric, "exact": True, "cap": self._cap(metric)}
        return dict(self._root[f"metrics/{metric}"].attrs)

    def info(self) -> dict:
        """Tokenizer, corpus, embeddings, versions, and the metrics with their k and cap."""
        out = {k: v for k, v in self.attrs.items() if k != "complete"}
        out["path"] = str(self.path)
        out["metrics"] = {m: {k: v for k, v in self.metric_attrs(m).items() if k != "params"} for m in self.metrics}
        return out

    def __repr__(self) -> str:
        return f"MetricStore({str(self.path)!r}, vocab_size={self.vocab_size}, metrics={self.metrics})"

    # -- arrays (lazy, cached) ----------------------------------------------------------
    def _array(self, key: str) -> np.ndarray:
        with self._lock:
            cache = self.__dict__.setdefault("_arrays", {})
            if key not in cache:
                cache[key] = self._root[key][...]
            return cache[key]

    @property
    def counts(self) -> np.ndarray:
        return self._array("tokens/count")

    @property
    def trained(self) -> np.ndarray:
        return self._array("tokens/trained")

    @property
    def borrowed_from(self) -> np.ndarray:
        return self._array("tokens/borrowed_from")

    @property
    def usable(self) -> np.ndarray:
        """Tokens with a vector a metric may use (trained, or borrowed)."""
        return self.trained | (self.borrowed_from >= 0)

    def embeddings(self, normalized: bool = False) -> np.ndarray:
        """The (V, d) float32 matrix; rows of unusable tokens are placeholders."""
        vectors = self._array("embeddings")
        if not normalized:
            return vectors
        with self._lock:
            if "_normalized" not in self.__dict__:
                self.__dict__["_normalized"] = _vectors.normalized(vectors)
            return self.__dict__["_normalized"]

    def projection2d(self) -> np.ndarray:
        """The (V, 2) float32 2-D map of the usable tokens (UMAP on the kNN graph); NaN rows
        for the others. For pictures (explorer, plots), not for costs."""
        if "projection2d" not in self._root:
            raise StoreError(f"{self.path} has no 2-D map (projection2d); rebuild it with `vocabmetric build` "
                             f"(the [projection] table is on by default)")
        return self._array("projection2d")

    def embedding(self, token: Token) -> np.ndarray:
        return self.embeddings()[self.resolve(token)]

    @cached_property
    def token_bytes_list(self) -> list[bytes]:
        flat = self._array("tokens/bytes").tobytes()
        offsets = self._array("tokens/offsets")
        return [flat[offsets[i] : offsets[i + 1]] for i in range(self.vocab_size)]

    def token_text(self, i: int) -> str:
        return self.token_bytes_list[int(i)].decode("utf-8", errors="backslashreplace")

    @cached_property
    def _by_text(self) -> dict[str, list[int]]:
        table: dict[str, list[int]] = {}
        for i, b in enumerate(self.token_bytes_list):
            if b:
                table.setdefault(b.decode("utf-8", errors="backslashreplace"), []).append(i)
        return table

    # -- tokens ---------------------------------------------------------------------------
    def resolve(self, token: Token) -> int:
        """The id of a token given as an id or a text; clear errors otherwise.

        A text must match exactly one id. An all-digit string is read as an id.
        """
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            i = int(token)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size}) for {self.tokenizer_spec}")
            return i
        if isinstance(token, str):
            ids = self._by_text.get(token, [])
            if len(ids) == 1:
                return ids[0]
            if token.strip().isdigit() and not ids:
                return self.resolve(int(token))
            if len(ids) > 1:
                raise TokenNotFound(f"token text {token!r} matches several ids: {ids}; pass the id instead")
            raise TokenNotFound(f"no token has the text {token!r} in {self.tokenizer_spec}{self._candidates(token)}")
        raise TokenizerError(f"a token is an id (int) or a text (str), got {type(token).__name__}")

    def ids_of_text(self, text: str) -> list[int]:
        """Every id whose token text (UTF-8, invalid bytes backslash-escaped) is ``text``."""
        return list(self._by_text.get(text, []))

    def _candidates(self, text: str) -> str:
        key = text.strip().lower()
        near = [t for t in (text.strip(), " " + text.strip(), key, " " + key, key.capitalize(), " " + key.capitalize()) if t in self._by_text]
        near = list(dict.fromkeys(near))[:6]
        return f"; did you mean {', '.join(repr(t) for t in near)}?" if near else ""

    # -- metrics --------------------------------------------------------------------------
    def _check_metric(self, metric: str) -> None:
        if metric not in self.metrics:
            raise StoreError(f"{self.path} has no metric {metric!r}; it has: {', '.join(self.metrics)}")

    def _cap(self, metric: str) -> float:
        caps = self.__dict__.setdefault("_caps", {})
        if metric not in caps:  # cached: a zarr metadata read costs ~0.5 ms, too much per query
            key = f"metrics/{metric}"
            # an exact l2 with no stored table: the largest distance between unit vectors
            caps[metric] = float(self._root[key].attrs["cap"]) if key in self._root else 2.0
        return caps[metric]

    def operator(self, metric: str = "knn") -> CostOperator:
        """The truncated :class:`CostOperator` of a stored metric (fingerprint set)."""
        cached = self.__dict__.get("_operators", {}).get(metric)
        if cached is not None:  # no zarr metadata read per query (~0.5 ms through zarr's sync loop)
            return cached
        self._check_metric(metric)
        if metric == TREE:
            raise StoreError("the tree metric is a TreeMetric, not a CostOperator: use store.tree()")
        if f"metrics/{metric}" not in self._root:
            raise StoreError(
                f"metric {metric!r} is computed exactly on demand and has no stored operator in {self.path}; "
                f"add it to the config's metrics to store its k nearest, or use one of: "
                f"{', '.join(m for m in self.metrics if m not in EXACT_METRICS and m != TREE)}"
            )
        with self._lock:
            cache = self.__dict__.setdefault("_operators", {})
            if metric not in cache:
                g = self._root[f"metrics/{metric}"]
                cache[metric] = CostOperator(g["indices"][...], g["costs"][...], float(g.attrs["cap"]), self.fingerprint)
            return cache[metric]

    def tree(self) -> TreeMetric:
        """The hierarchical :class:`TreeMetric` (fingerprint set)."""
        if TREE not in self.metrics:
            raise StoreError(f"{self.path} has no tree metric; add [metrics.tree] to the config and rebuild")
        with self._lock:
            if "_tree" not in self.__dict__:
                g = self._root[f"metrics/{TREE}"]
                self.__dict__["_tree"] = TreeMetric(g["parent"][...], g["weight"][...], g["leaf_of_token"][...], self.fingerprint)
            return self.__dict__["_tree"]

    def cost(self, a: Token, b: Token, metric: str = "l2") -> float:
        """The cost between two tokens under ``metric``."""
        i, j = self.resolve(a), self.resolve(b)
        return float(self.costs_from(i, np.array([j]), metric)[0])

    def costs_from(self, i: int, js: np.ndarray, metric: str) -> np.ndarray:
        """Costs from token ``i`` to each of ``js`` (int array), float32."""
        js = np.asarray(js, dtype=np.int64)
        return self.pair_costs(np.full(len(js), int(i)), js, metric)

    def pair_costs(self, i: Any, j: Any, metric: str) -> np.ndarray:
        """Costs of the pairs ``(i[t], j[t])`` (broadcast int id arrays), float32.

        O(d) per pair for ``l2`` (exact, :func:`~vocabmetric._vectors.l2_distance`; an unusable
        token costs the cap 2), O(k) for a stored metric, O(depth) for ``tree``.
        """
        self._check_metric(metric)
        i, j = np.broadcast_arrays(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
        for t in (i, j):
            if t.size and (t.min() < 0 or t.max() >= self.vocab_size):
                bad = int(t.min() if t.min() < 0 else t.max())
                raise TokenizerError(f"token id {bad} is out of range [0, {self.vocab_size}) for {self.tokenizer_spec}")
        if metric == TREE:
            return np.asarray(self.tree().distance(i, j), dtype=np.float32)
        if metric in EXACT_METRICS:
            d = _vectors.l2_distance(self.embeddings(), i, j)
            usable = self.usable
            d = np.where(usable[i] & usable[j], d, self._cap(metric))
            return np.where(i == j, 0.0, d).astype(np.float32)
        return np.asarray(self.operator(metric).cost(i, j), dtype=np.float32)

    def neighbors(self, token: Token, k: int = 10, metric: str = "knn") -> list[Neighbor]:
        """The ``k`` cheapest tokens from ``token`` under ``metric`` (the token itself excluded).

        Stored metrics return their stored neighbours (at most the stored k); ``l2`` and
        ``tree`` are computed exactly over every usable token (O(V·d) / O(V·depth)).
        An untrained token under the ``isolate`` policy has no neighbours.
        """
        i = self.resolve(token)
        self._check_metric(metric)
        if k < 1:
            raise VocabMetricError(f"k must be >= 1, got {k}")
        if metric in EXACT_METRICS or metric == TREE:
            if not self.usable[i]:
                return []
            candidates = np.flatnonzero(self.usable)
            candidates = candidates[candidates != i]
            costs = self.costs_from(i, candidates, metric)
            top = np.argsort(costs, kind="stable")[:k]
            ids, cs = candidates[top], costs[top]
        else:
            ids, cs = self.operator(metric).neighbors(i)
            ids, cs = ids[:k], cs[:k]
        return [Neighbor(int(j), self.token_text(j), float(c)) for j, c in zip(ids, cs)]

    def faiss_index(self):
        """The faiss inner-product index over the normalized usable embeddings (ids = token ids)."""
        import faiss

        return faiss.read_index(str(self.path / "index.faiss"))
